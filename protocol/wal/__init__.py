"""Write-ahead log: format, writer, recovery (see format.py for the byte layout)."""
