"""Following a growing file: the TUI's watcher and `forge runs logs -f` read through one FileTail."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from assistant_forge.core.runs import RunLock, follow_file, write_status
from assistant_forge.core.tail import FileTail


def test_a_tail_returns_complete_lines_once_and_starts_over_when_the_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "train.log"
    tail = FileTail(path)
    assert tail.read_lines() == []  # no file yet
    path.write_bytes(b"one\r\ntw")
    assert tail.read_lines() == ["one"]
    with open(path, "ab") as f:
        f.write(b"o\nthree\n")
    assert tail.read_lines() == ["two", "three"]
    assert tail.read_lines() == []
    path.write_bytes(b"new\n")  # shorter than what was read: a new file
    assert tail.read_lines() == ["new"]


def test_a_tail_with_a_backlog_starts_near_the_end(tmp_path: Path) -> None:
    path = tmp_path / "train.log"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(1000)))
    lines = FileTail(path, backlog=64).read_lines()
    assert lines[-1] == "line 999" and 1 < len(lines) <= 64 // len("line 999\n") + 1


def test_follow_file_prints_until_the_trainer_is_gone_then_its_unfinished_last_line(tmp_path: Path) -> None:
    """A real lock stands for the trainer; a writer thread appends, then lets go of it."""
    run = tmp_path / "run"
    run.mkdir()
    write_status(run, state="running")
    log = run / "train.log"
    log.write_bytes(b"loading\n")
    lock = RunLock(run)
    assert lock.acquire()

    def trainer() -> None:
        for chunk in (b"step 1\n", b" 50%|##\r100%|####\r\n", b"done, no newline"):
            time.sleep(0.3)
            with open(log, "ab") as f:
                f.write(chunk)
        time.sleep(0.3)
        write_status(run, state="finished")
        lock.release()

    writer = threading.Thread(target=trainer)
    writer.start()
    lines = list(follow_file(log, run, poll_s=0.05))
    writer.join()
    assert lines == ["loading", "step 1", " 50%|##", "100%|####", "done, no newline"]


def test_read_jsonl_skips_a_torn_line_and_one_still_being_written(tmp_path: Path) -> None:
    from assistant_forge.core.runs import read_jsonl

    path = tmp_path / "events.jsonl"
    assert read_jsonl(path) == []
    path.write_text('{"step": 1}\n{"step": 2, "lo\n[1, 2]\n{"step": 3}\n{"step": 4')
    assert read_jsonl(path) == [{"step": 1}, {"step": 3}]
