"""The built-in demo: synthetic identities, a real RecordIO dataset, train, evaluate, export."""
