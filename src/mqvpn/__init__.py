"""mqvpn: a multipath QUIC VPN (MASQUE CONNECT-IP) for Linux."""

__version__ = "0.1.0.dev0"
