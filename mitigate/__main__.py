from mitigate.cli import main

main()
