"""Trade execution for synthetic index positions on Bybit."""
