"""MASQUE: HTTP/3 (``h3``: the connection, ``h3frames``: its wire format), HTTP Datagrams and the Capsule Protocol,
on top of ``mqvpn.quic``. Sans-I/O like the transport below it."""
