from fireside.cli import main

raise SystemExit(main())
