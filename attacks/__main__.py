from attacks.cli import main

raise SystemExit(main())
