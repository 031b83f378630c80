"""Key custody on the appliance: the in-memory key ring and the one client
that fetches keys from the control endpoint (ring), the cryptographic
primitives every part uses (crypto) and the certificates the appliance and
its tests generate (pki)."""
