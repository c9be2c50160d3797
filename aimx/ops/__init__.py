"""Operations: setup, doctor, DNS checks, init systems, agents, keys and certificates,
the port-25 verifier."""
