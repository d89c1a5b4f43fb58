from clipkit.cli import main

main()
