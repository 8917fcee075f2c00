from assistant_forge.training.trainer import main

raise SystemExit(main())
