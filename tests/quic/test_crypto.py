"""Packet protection: RFC 9001 Appendix A vectors, the multipath nonce, key update, tampering, round trips, fuzz."""

import hmac
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from hypothesis import given, settings, strategies as st

from mqvpn.quic.crypto import (
    INITIAL_SALT_V1,
    SAMPLE_SIZE,
    TAG_SIZE,
    CipherSuite,
    EpochKeys,
    HeaderProtection,
    PacketKey,
    derive_initial_secrets,
    hkdf_expand,
    hkdf_expand_label,
    hkdf_extract,
    open_payload,
    protect_packet,
    retry_integrity_tag,
    stateless_reset_token,
    unprotect_header,
)
from mqvpn.quic.errors import CryptoError


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# ---------------------------------------------------------------------------------------------------------------------
# RFC 9001 Appendix A vectors
# ---------------------------------------------------------------------------------------------------------------------

DCID = h("8394c8f03e515708")

CLIENT_INITIAL_PAYLOAD = h(
    """
    060040f1010000ed0303ebf8fa56f129 39b9584a3896472ec40bb863cfd3e868
    04fe3a47f06a2b69484c000004130113 02010000c000000010000e00000b6578
    616d706c652e636f6dff01000100000a 00080006001d00170018001000070005
    04616c706e0005000501000000000033 00260024001d00209370b2c9caa47fba
    baf4559fedba753de171fa71f50f1ce1 5d43e994ec74d748002b000302030400
    0d0010000e0403050306030203080408 050806002d00020101001c0002400100
    3900320408ffffffffffffffff050480 00ffff07048000ffff08011001048000
    75300901100f088394c8f03e51570806 048000ffff
    """
).ljust(1162, b"\x00")
CLIENT_INITIAL_HEADER = h("c300000001088394c8f03e5157080000449e00000002")
CLIENT_INITIAL_PROTECTED = h(
    """
    c000000001088394c8f03e5157080000 449e7b9aec34d1b1c98dd7689fb8ec11
    d242b123dc9bd8bab936b47d92ec356c 0bab7df5976d27cd449f63300099f399
    1c260ec4c60d17b31f8429157bb35a12 82a643a8d2262cad67500cadb8e7378c
    8eb7539ec4d4905fed1bee1fc8aafba1 7c750e2c7ace01e6005f80fcb7df6212
    30c83711b39343fa028cea7f7fb5ff89 eac2308249a02252155e2347b63d58c5
    457afd84d05dfffdb20392844ae81215 4682e9cf012f9021a6f0be17ddd0c208
    4dce25ff9b06cde535d0f920a2db1bf3 62c23e596d11a4f5a6cf3948838a3aec
    4e15daf8500a6ef69ec4e3feb6b1d98e 610ac8b7ec3faf6ad760b7bad1db4ba3
    485e8a94dc250ae3fdb41ed15fb6a8e5 eba0fc3dd60bc8e30c5c4287e53805db
    059ae0648db2f64264ed5e39be2e20d8 2df566da8dd5998ccabdae053060ae6c
    7b4378e846d29f37ed7b4ea9ec5d82e7 961b7f25a9323851f681d582363aa5f8
    9937f5a67258bf63ad6f1a0b1d96dbd4 faddfcefc5266ba6611722395c906556
    be52afe3f565636ad1b17d508b73d874 3eeb524be22b3dcbc2c7468d54119c74
    68449a13d8e3b95811a198f3491de3e7 fe942b330407abf82a4ed7c1b311663a
    c69890f4157015853d91e923037c227a 33cdd5ec281ca3f79c44546b9d90ca00
    f064c99e3dd97911d39fe9c5d0b23a22 9a234cb36186c4819e8b9c5927726632
    291d6a418211cc2962e20fe47feb3edf 330f2c603a9d48c0fcb5699dbfe58964
    25c5bac4aee82e57a85aaf4e2513e4f0 5796b07ba2ee47d80506f8d2c25e50fd
    14de71e6c418559302f939b0e1abd576 f279c4b2e0feb85c1f28ff18f58891ff
    ef132eef2fa09346aee33c28eb130ff2 8f5b766953334113211996d20011a198
    e3fc433f9f2541010ae17c1bf202580f 6047472fb36857fe843b19f5984009dd
    c324044e847a4f4a0ab34f719595de37 252d6235365e9b84392b061085349d73
    203a4a13e96f5432ec0fd4a1ee65accd d5e3904df54c1da510b0ff20dcc0c77f
    cb2c0e0eb605cb0504db87632cf3d8b4 dae6e705769d1de354270123cb11450e
    fc60ac47683d7b8d0f811365565fd98c 4c8eb936bcab8d069fc33bd801b03ade
    a2e1fbc5aa463d08ca19896d2bf59a07 1b851e6c239052172f296bfb5e724047
    90a2181014f3b94a4e97d117b4381303 68cc39dbb2d198065ae3986547926cd2
    162f40a29f0c3c8745c0f50fba3852e5 66d44575c29d39a03f0cda721984b6f4
    40591f355e12d439ff150aab7613499d bd49adabc8676eef023b15b65bfc5ca0
    6948109f23f350db82123535eb8a7433 bdabcb909271a6ecbcb58b936a88cd4e
    8f2e6ff5800175f113253d8fa9ca8885 c2f552e657dc603f252e1a8e308f76f0
    be79e2fb8f5d5fbbe2e30ecadd220723 c8c0aea8078cdfcb3868263ff8f09400
    54da48781893a7e49ad5aff4af300cd8 04a6b6279ab3ff3afb64491c85194aab
    760d58a606654f9f4400e8b38591356f bf6425aca26dc85244259ff2b19c41b9
    f96f3ca9ec1dde434da7d2d392b905dd f3d1f9af93d1af5950bd493f5aa731b4
    056df31bd267b6b90a079831aaf579be 0a39013137aac6d404f518cfd4684064
    7e78bfe706ca4cf5e9c5453e9f7cfd2b 8b4c8d169a44e55c88d4a9a7f9474241
    e221af44860018ab0856972e194cd934
    """
)

SERVER_INITIAL_PAYLOAD = h(
    """
    02000000000600405a020000560303ee fce7f7b37ba1d1632e96677825ddf739
    88cfc79825df566dc5430b9a045a1200 130100002e00330024001d00209d3c94
    0d89690b84d08a60993c144eca684d10 81287c834d5311bcf32bb9da1a002b00
    020304
    """
)
SERVER_INITIAL_HEADER = h("c1000000010008f067a5502a4262b50040750001")
SERVER_INITIAL_PROTECTED = h(
    """
    cf000000010008f067a5502a4262b500 4075c0d95a482cd0991cd25b0aac406a
    5816b6394100f37a1c69797554780bb3 8cc5a99f5ede4cf73c3ec2493a1839b3
    dbcba3f6ea46c5b7684df3548e7ddeb9 c3bf9c73cc3f3bded74b562bfb19fb84
    022f8ef4cdd93795d77d06edbb7aaf2f 58891850abbdca3d20398c276456cbc4
    2158407dd074ee
    """
)

CHACHA_SECRET = h("9ac312a7f877468ebe69422748ad00a1 5443f18203a07d6060f688f30f21632b")


def test_a1_initial_secrets_and_keys():
    assert INITIAL_SALT_V1 == h("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")
    assert hkdf_extract(hashes.SHA256(), INITIAL_SALT_V1, DCID) == h(
        "7db5df06e7a69e432496adedb0085192 3595221596ae2ae9fb8115c1e9ed0a44"
    )
    client, server = derive_initial_secrets(DCID)
    assert client == h("c00cf151ca5be075ed0ebfb5c80323c4 2d6b7db67881289af4008f1f6c357aea")
    assert server == h("3c199828fd139efd216c155ad844cc81 fb82fa8d7446fa7d78be803acdda951b")

    key = PacketKey(CipherSuite.AES_128_GCM_SHA256, client)
    assert key.key == h("1f369613dd76d5467730efcbe3b1a22d")
    assert key.iv == h("fa044b2f42a3fd3b46fb255c")
    assert HeaderProtection(CipherSuite.AES_128_GCM_SHA256, client).key == h("9f50449e04a0e810283a1e9933adedd2")

    key = PacketKey(CipherSuite.AES_128_GCM_SHA256, server)
    assert key.key == h("cf3a5331653c364c88f0f379b6067e37")
    assert key.iv == h("0ac1493ca1905853b0bba03e")
    assert HeaderProtection(CipherSuite.AES_128_GCM_SHA256, server).key == h("c206b8d9b9f0f37644430b490eeaa314")


def test_hkdf_expand_label_accepts_hash_names_and_objects():
    secret = derive_initial_secrets(DCID)[0]
    expected = h("1f369613dd76d5467730efcbe3b1a22d")
    assert hkdf_expand_label("sha256", secret, b"quic key", b"", 16) == expected
    assert hkdf_expand_label(hashes.SHA256(), secret, b"quic key", b"", 16) == expected


@pytest.mark.parametrize("alg", [hashes.SHA256(), hashes.SHA384()])
@pytest.mark.parametrize("length", [1, 16, 32, 48, 100, 255])
def test_hkdf_matches_cryptography(alg, length):
    salt, ikm, info = os.urandom(20), os.urandom(33), os.urandom(17)
    assert hkdf_expand(alg, hkdf_extract(alg, salt, ikm), info, length) == HKDF(alg, length, salt, info).derive(ikm)
    prk = os.urandom(alg.digest_size)
    assert hkdf_expand(alg.name, prk, info, length) == HKDFExpand(alg, length, info).derive(prk)


def test_hkdf_rfc5869_case1():
    prk = hkdf_extract("sha256", h("000102030405060708090a0b0c"), b"\x0b" * 22)
    assert prk == h("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
    assert hkdf_expand("sha256", prk, h("f0f1f2f3f4f5f6f7f8f9"), 42) == h(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_a2_client_initial_protect_and_unprotect():
    assert len(CLIENT_INITIAL_PROTECTED) == 1200
    keys = EpochKeys()
    keys.setup_initial(DCID, is_client=True)
    assert keys.send_hp.mask(h("d1b1c98dd7689fb8ec11d242b123dc9b")) == h("437b9aec36")

    packet = protect_packet(keys.send_key, keys.send_hp, CLIENT_INITIAL_HEADER, CLIENT_INITIAL_PAYLOAD, 2)
    assert packet == CLIENT_INITIAL_PROTECTED

    server = EpochKeys()
    server.setup_initial(DCID, is_client=False)
    pn_offset = len(CLIENT_INITIAL_HEADER) - 4
    plain_header, truncated_pn, pn_len = unprotect_header(server.recv_hp, packet, pn_offset)
    assert (plain_header, truncated_pn, pn_len) == (CLIENT_INITIAL_HEADER, 2, 4)
    assert open_payload(server.recv_key, plain_header, packet, len(packet), 2) == CLIENT_INITIAL_PAYLOAD
    # also from a memoryview, with trailing bytes of a coalesced datagram after the packet
    datagram = memoryview(packet + b"\xaa" * 37)
    plain_header2, _, _ = unprotect_header(server.recv_hp, datagram, pn_offset)
    assert plain_header2 == plain_header
    assert open_payload(server.recv_key, plain_header2, datagram, len(packet), 2) == CLIENT_INITIAL_PAYLOAD


def test_a3_server_initial():
    server = EpochKeys()
    server.setup_initial(DCID, is_client=False)
    assert server.send_hp.mask(h("2cd0991cd25b0aac406a5816b6394100")) == h("2ec0d8356a")
    packet = protect_packet(server.send_key, server.send_hp, SERVER_INITIAL_HEADER, SERVER_INITIAL_PAYLOAD, 1)
    assert packet == SERVER_INITIAL_PROTECTED
    assert packet[: len(SERVER_INITIAL_HEADER)] == h("cf000000010008f067a5502a4262b5004075c0d9")

    client = EpochKeys()
    client.setup_initial(DCID, is_client=True)
    plain_header, truncated_pn, pn_len = unprotect_header(client.recv_hp, packet, len(SERVER_INITIAL_HEADER) - 2)
    assert (plain_header, truncated_pn, pn_len) == (SERVER_INITIAL_HEADER, 1, 2)
    assert open_payload(client.recv_key, plain_header, packet, len(packet), 1) == SERVER_INITIAL_PAYLOAD


def test_a4_retry_integrity_tag():
    retry = h("ff000000010008f067a5502a4262b574 6f6b656e04a265ba2eff4d829058fb3f 0f2496ba")
    pseudo = bytes([len(DCID)]) + DCID + retry[:-16]
    assert retry_integrity_tag(pseudo) == retry[-16:]
    assert retry_integrity_tag(bytes([8]) + bytes(8) + retry[:-16]) != retry[-16:]


def test_a5_chacha20_short_header():
    suite = CipherSuite.CHACHA20_POLY1305_SHA256
    key = PacketKey(suite, CHACHA_SECRET)
    hp = HeaderProtection(suite, CHACHA_SECRET)
    assert key.key == h("c6d98ff3441c3fe1b2182094f69caa2e d4b716b65488960a7a984979fb23e1c8")
    assert key.iv == h("e0459b3474bdd0e44a41c144")
    assert hp.key == h("25a282b9e82f06f21f488917a4fc8f1b 73573685608597d0efcb076b0ab7a7a4")
    assert key.next_generation().secret == h("1223504755036d556342ee9361d25342 1a826c9ecdf3c7148684b36b714881f9")

    pn = 654360564
    assert key.nonce(pn) == h("e0459b3474bdd0e46d417eb0")
    assert key.seal(pn, h("4200bff4"), b"\x01") == h("655e5cd55c41f69080575d7999c25a5bfb")
    assert hp.mask(h("5e5cd55c41f69080575d7999c25a5bfb")) == h("aefefe7d03")

    packet = protect_packet(key, hp, h("4200bff4"), b"\x01", pn)
    assert packet == h("4cfe4189655e5cd55c41f69080575d7999c25a5bfb")
    plain_header, truncated_pn, pn_len = unprotect_header(hp, packet, 1)
    assert (plain_header, truncated_pn, pn_len) == (h("4200bff4"), 49140, 3)
    assert open_payload(key, plain_header, packet, len(packet), pn) == b"\x01"


# ---------------------------------------------------------------------------------------------------------------------
# Multipath nonce, key update, other suites
# ---------------------------------------------------------------------------------------------------------------------


def test_multipath_nonce_example():
    key = PacketKey.from_key_iv(CipherSuite.AES_128_GCM_SHA256, bytes(16), h("6b26114b9cba2b63a9e8dd4f"))
    assert key.nonce((3 << 64) | 54321) == h("6b2611489cba2b63a9e8097e")
    # path 0 is RFC 9001: IV XOR packet number
    assert key.nonce(54321) == h("6b26114b9cba2b63a9e8097e")


def test_protect_uses_multipath_nonce():
    secret = os.urandom(32)
    key = PacketKey(CipherSuite.AES_128_GCM_SHA256, secret)
    hp = HeaderProtection(CipherSuite.AES_128_GCM_SHA256, secret)
    header = bytes([0x41]) + os.urandom(8) + (54321 & 0xFFFF).to_bytes(2, "big")
    payload = os.urandom(50)
    packet = protect_packet(key, hp, header, payload, 54321, path_id=3)
    expected = AESGCM(key.key).encrypt(key.nonce((3 << 64) | 54321), payload, header)
    assert packet[len(header) :] == expected
    # the same packet number on another path gives another ciphertext, and only opens with its own path id
    assert protect_packet(key, hp, header, payload, 54321, path_id=0)[len(header) :] != expected
    plain_header, _, _ = unprotect_header(hp, packet, 9)
    assert open_payload(key, plain_header, packet, len(packet), 54321, path_id=3) == payload
    with pytest.raises(CryptoError):
        open_payload(key, plain_header, packet, len(packet), 54321, path_id=0)
    with pytest.raises(CryptoError):
        open_payload(key, plain_header, packet, len(packet), 54321, path_id=2)


def test_seal_open():
    key = PacketKey(CipherSuite.AES_128_GCM_SHA256, os.urandom(32))
    sealed = key.seal(7, b"aad", b"hello")
    assert len(sealed) == 5 + TAG_SIZE
    assert key.open(7, b"aad", sealed) == b"hello"
    assert key.open(7, b"aad", memoryview(sealed)) == b"hello"
    for pn, aad, data in [(8, b"aad", sealed), (7, b"aaD", sealed), (7, b"aad", sealed[:-1] + bytes((sealed[-1] ^ 1,))), (7, b"", b"")]:
        with pytest.raises(CryptoError):
            key.open(pn, aad, data)


def test_key_update_next_generation():
    for suite, hash_alg in [
        (CipherSuite.AES_128_GCM_SHA256, "sha256"),
        (CipherSuite.AES_256_GCM_SHA384, "sha384"),
        (CipherSuite.CHACHA20_POLY1305_SHA256, "sha256"),
    ]:
        hash_len = 48 if hash_alg == "sha384" else 32
        secret = os.urandom(hash_len)
        key0 = PacketKey(suite, secret)
        key1 = key0.next_generation()
        key2 = key1.next_generation()
        assert key1.cipher_suite == suite
        assert key1.secret == hkdf_expand_label(hash_alg, secret, b"quic ku", b"", hash_len)
        assert key2.secret == hkdf_expand_label(hash_alg, key1.secret, b"quic ku", b"", hash_len)
        assert len({key0.key, key1.key, key2.key}) == 3 and len({key0.iv, key1.iv, key2.iv}) == 3
        # header protection stays with the original secret: a key-updated packet still unmasks with the old hp
        hp = HeaderProtection(suite, secret)
        header = bytes([0x44 | 0x01]) + os.urandom(4) + b"\x00\x09"
        packet = protect_packet(key1, hp, header, b"payload", 9)
        plain_header, truncated_pn, _ = unprotect_header(hp, packet, 5)
        assert plain_header == header and plain_header[0] & 0x04
        assert open_payload(key1, plain_header, packet, len(packet), truncated_pn) == b"payload"
        with pytest.raises(CryptoError):
            open_payload(key0, plain_header, packet, len(packet), truncated_pn)
    with pytest.raises(ValueError):
        PacketKey.from_key_iv(CipherSuite.AES_128_GCM_SHA256, bytes(16), bytes(12)).next_generation()


def test_aes_256_gcm_round_trip():
    suite = CipherSuite.AES_256_GCM_SHA384
    secret = os.urandom(48)
    key = PacketKey(suite, secret)
    hp = HeaderProtection(suite, secret)
    assert len(key.key) == 32 and len(key.iv) == 12 and len(hp.key) == 32
    # Handshake long header: first byte (2-byte pn), version, DCID, SCID, Length 1218 (varint), pn 0x0123
    header = h("e1 00000001 04 01020304 04 05060708 44c2 0123")
    payload = os.urandom(1200)
    packet = protect_packet(key, hp, header, payload, 0x123)
    assert len(packet) == len(header) + len(payload) + TAG_SIZE
    assert packet[len(header) :] == AESGCM(key.key).encrypt(key.nonce(0x123), payload, header)
    plain_header, truncated_pn, pn_len = unprotect_header(hp, packet, len(header) - 2)
    assert (plain_header, truncated_pn, pn_len) == (header, 0x123, 2)
    assert open_payload(key, plain_header, packet, len(packet), 0x123) == payload


def test_chacha_round_trip_matches_reference_aead():
    suite = CipherSuite.CHACHA20_POLY1305_SHA256
    secret = os.urandom(32)
    key = PacketKey(suite, secret)
    hp = HeaderProtection(suite, secret)
    header = bytes([0x43]) + os.urandom(8) + (1000).to_bytes(4, "big")
    payload = os.urandom(300)
    packet = protect_packet(key, hp, header, payload, 1000, path_id=5)
    assert packet[len(header) :] == ChaCha20Poly1305(key.key).encrypt(key.nonce((5 << 64) | 1000), payload, header)


def test_header_protection_mask_rejects_bad_sample_length():
    for suite in CipherSuite:
        hp = HeaderProtection(suite, os.urandom(48 if suite == CipherSuite.AES_256_GCM_SHA384 else 32))
        sample = os.urandom(SAMPLE_SIZE)
        expected = hp.mask(sample)
        assert len(expected) == 5
        for bad in (sample[:15], sample + b"\x00", b""):
            with pytest.raises(ValueError):
                hp.mask(bad)
        assert hp.mask(sample) == expected  # a rejected sample left no state behind


def test_unknown_cipher_suite():
    with pytest.raises(ValueError):
        PacketKey(0x1304, bytes(32))
    with pytest.raises(ValueError):
        HeaderProtection(0x1305, bytes(32))


def test_protect_rejects_payload_too_short_to_sample():
    keys = EpochKeys()
    keys.setup_initial(DCID, is_client=True)
    header = bytes([0x40]) + bytes(8) + b"\x05"  # 1-byte pn: needs 3 payload bytes
    with pytest.raises(ValueError):
        protect_packet(keys.send_key, keys.send_hp, header, b"\x01\x00", 5)
    protect_packet(keys.send_key, keys.send_hp, header, b"\x01\x00\x00", 5)


# ---------------------------------------------------------------------------------------------------------------------
# Tampering
# ---------------------------------------------------------------------------------------------------------------------


def _one_rtt_packet():
    secret = os.urandom(32)
    key = PacketKey(CipherSuite.AES_128_GCM_SHA256, secret)
    hp = HeaderProtection(CipherSuite.AES_128_GCM_SHA256, secret)
    header = bytes([0x42]) + bytes(range(8)) + (777).to_bytes(3, "big")
    payload = os.urandom(100)
    return key, hp, header, payload, protect_packet(key, hp, header, payload, 777)


@pytest.mark.parametrize("position", [0, 1, 8, 9, 10, 11, 12, 50, -1])
def test_tampered_packet_fails(position):
    key, hp, header, payload, packet = _one_rtt_packet()
    tampered = bytearray(packet)
    tampered[position] ^= 0x01
    with pytest.raises(CryptoError):
        plain_header, truncated_pn, pn_len = unprotect_header(hp, bytes(tampered), 9)
        # a flipped pn or first-byte bit may change the pn length: use what the header says, as a receiver would
        open_payload(key, plain_header, bytes(tampered), len(tampered), truncated_pn)


def test_wrong_packet_number_or_truncation_fails():
    key, hp, header, payload, packet = _one_rtt_packet()
    plain_header, truncated_pn, _ = unprotect_header(hp, packet, 9)
    assert open_payload(key, plain_header, packet, len(packet), 777) == payload
    with pytest.raises(CryptoError):
        open_payload(key, plain_header, packet, len(packet), 778)
    with pytest.raises(CryptoError):
        open_payload(key, plain_header, packet, len(packet) - 1, 777)
    with pytest.raises(CryptoError):
        unprotect_header(hp, packet[: 9 + 4 + SAMPLE_SIZE - 1], 9)
    unprotect_header(hp, packet[: 9 + 4 + SAMPLE_SIZE], 9)  # exactly enough to sample


def test_other_key_fails():
    key, hp, header, payload, packet = _one_rtt_packet()
    other = PacketKey(CipherSuite.AES_128_GCM_SHA256, os.urandom(32))
    plain_header, truncated_pn, _ = unprotect_header(hp, packet, 9)
    with pytest.raises(CryptoError):
        open_payload(other, plain_header, packet, len(packet), 777)


# ---------------------------------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------------------------------


def test_stateless_reset_token():
    static_key = os.urandom(32)
    cid = os.urandom(8)
    token = stateless_reset_token(static_key, cid)
    assert len(token) == 16
    assert token == hmac.digest(static_key, cid, "sha256")[:16]
    assert token == stateless_reset_token(static_key, cid)
    assert token != stateless_reset_token(static_key, cid[:-1] + bytes([cid[-1] ^ 1]))
    assert token != stateless_reset_token(os.urandom(32), cid)


def test_epoch_keys():
    keys = EpochKeys()
    assert keys.send_key is keys.send_hp is keys.recv_key is keys.recv_hp is None
    assert not keys.can_send and not keys.can_receive
    client_secret, server_secret = derive_initial_secrets(DCID)
    keys.setup_initial(DCID, is_client=False)
    assert keys.send_key.secret == server_secret and keys.recv_key.secret == client_secret
    assert keys.send_key.cipher_suite == CipherSuite.AES_128_GCM_SHA256
    keys.install_send(CipherSuite.CHACHA20_POLY1305_SHA256, CHACHA_SECRET)
    assert keys.send_key.cipher_suite == CipherSuite.CHACHA20_POLY1305_SHA256
    assert keys.send_hp.cipher_suite == CipherSuite.CHACHA20_POLY1305_SHA256
    assert keys.recv_key.cipher_suite == CipherSuite.AES_128_GCM_SHA256
    keys.discard()
    assert keys.send_key is keys.send_hp is keys.recv_key is keys.recv_hp is None


# ---------------------------------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------------------------------

SECRET_LEN = {
    CipherSuite.AES_128_GCM_SHA256: 32,
    CipherSuite.AES_256_GCM_SHA384: 48,
    CipherSuite.CHACHA20_POLY1305_SHA256: 32,
}
_KEYS = {
    suite: (PacketKey(suite, bytes(range(n))), HeaderProtection(suite, bytes(range(n))))
    for suite, n in SECRET_LEN.items()
}


@settings(max_examples=300, deadline=None)
@given(
    suite=st.sampled_from(list(CipherSuite)),
    long_header=st.booleans(),
    first_bits=st.integers(0, 0x3F),
    middle=st.binary(max_size=40),
    pn=st.integers(0, (1 << 62) - 1),
    pn_len=st.integers(1, 4),
    path_id=st.integers(0, (1 << 32) - 1),
    payload=st.binary(min_size=3, max_size=1500),
    trailing=st.binary(max_size=30),
)
def test_round_trip(suite, long_header, first_bits, middle, pn, pn_len, path_id, payload, trailing):
    key, hp = _KEYS[suite]
    first = (0xC0 if long_header else 0x40) | (first_bits & 0x3C) | (pn_len - 1)
    truncated = pn & ((1 << (8 * pn_len)) - 1)
    header = bytes([first]) + middle + truncated.to_bytes(pn_len, "big")
    pn_offset = 1 + len(middle)

    packet = protect_packet(key, hp, header, payload, pn, path_id)
    assert len(packet) == len(header) + len(payload) + TAG_SIZE
    # only the protected bits of the first byte and the pn bytes change
    keep = 0xF0 if long_header else 0xE0
    assert packet[0] & keep == first & keep
    assert packet[1:pn_offset] == middle

    datagram = packet + trailing
    plain_header, truncated_pn, got_pn_len = unprotect_header(hp, datagram, pn_offset)
    assert plain_header == header
    assert truncated_pn == truncated
    assert got_pn_len == pn_len
    assert open_payload(key, plain_header, datagram, len(packet), pn, path_id) == payload
    assert open_payload(key, plain_header, memoryview(datagram), len(packet), pn, path_id) == payload


@settings(max_examples=500, deadline=None)
@given(
    suite=st.sampled_from(list(CipherSuite)),
    packet=st.binary(max_size=200),
    pn_offset=st.integers(-5, 80),
    payload_end=st.integers(-10, 250),
    full_pn=st.one_of(st.integers(0, (1 << 62) - 1), st.integers(-(1 << 70), 1 << 100)),
    path_id=st.integers(0, 1 << 40),
    use_memoryview=st.booleans(),
)
def test_fuzz_only_crypto_error(suite, packet, pn_offset, payload_end, full_pn, path_id, use_memoryview):
    key, hp = _KEYS[suite]
    data = memoryview(packet) if use_memoryview else packet
    try:
        plain_header, truncated_pn, pn_len = unprotect_header(hp, data, pn_offset)
    except CryptoError:
        plain_header = packet[: max(pn_offset, 0) + 1]
    else:
        assert 1 <= pn_len <= 4 and len(plain_header) == pn_offset + pn_len
        assert 0 <= truncated_pn < 1 << (8 * pn_len)
    with pytest.raises(CryptoError):
        open_payload(key, plain_header, data, payload_end, full_pn, path_id)
