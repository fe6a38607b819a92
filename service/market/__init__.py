"""Market data: instrument filters and reference prices.

- `snapshot`: the shared snapshot in Redis and its reader; what the API imports (no exchange
  client).
- `data`: the workers' reader (the snapshot when fresh enough, else the exchange).
- `refresh`: the Beat job that reads the exchange and writes the snapshot.
"""
