from assistant_forge.cli import main

raise SystemExit(main())
