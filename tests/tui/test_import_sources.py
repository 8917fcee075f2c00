"""The dataset screen's import reads every source the CLI reads: here a Parquet file and a folder."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .helpers import wait_in_app

DATA = Path(__file__).parent.parent / "fixtures" / "data"


def test_import_a_parquet_file_then_a_downloaded_hub_folder(tmp_path: Path, monkeypatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    rows = [json.loads(line) for line in (DATA / "guanaco.jsonl").read_text(encoding="utf-8").splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "guanaco.parquet")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")

    async def main() -> None:
        from assistant_forge.tui.app import ForgeApp

        app = ForgeApp()
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("2")
            screen = app.screen
            screen.query_one("#ds-path").value = str(tmp_path / "guanaco.parquet")
            await pilot.press("escape", "i")
            await wait_in_app(pilot, lambda: len(screen.records) == 4, 20, "parquet import")
            assert screen.records[1]["messages"][0]["content"].startswith("你好")
            screen.query_one("#ds-path").value = str(tmp_path / "hub")
            await pilot.press("escape", "i")
            await wait_in_app(pilot, lambda: len(screen.records) == 6, 20, "folder import")
            screen.query_one("#ds-path").value = str(tmp_path / "nothing.parquet")
            await pilot.press("escape", "i")
            await wait_in_app(pilot, lambda: screen.query_one("#data-msg").has_class("error"), 10, "error")
            assert "nothing.parquet does not exist" in str(screen.query_one("#data-msg").render())

    asyncio.run(main())
