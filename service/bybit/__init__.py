"""The Bybit V5 adapter: constants, signing, the aiohttp client, its errors and typed results.

It knows nothing of the database or of positions; everything above it speaks Decimal.
"""
