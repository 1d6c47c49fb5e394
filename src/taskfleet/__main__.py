from taskfleet.cli.main import main

main()
