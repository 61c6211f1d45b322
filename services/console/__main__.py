"""`python -m services.console` = `orderpipe run ops-console`: the operators' web console."""

from services.console.process import main

main()
