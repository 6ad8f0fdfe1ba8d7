from evp.cli import main

main()
