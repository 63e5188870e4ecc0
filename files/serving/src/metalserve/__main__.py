from metalserve.cli import main

raise SystemExit(main())
