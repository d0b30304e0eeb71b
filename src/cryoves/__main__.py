from cryoves.cli import main

main()
