"""Candidates and SDP captured from a real Chromium (Debian's, driven by Playwright) calling
through coturn on loopback, once with iceTransportPolicy "all" and once "relay". The
machine's own addresses were 192.0.2.2 and fd00::2; in the relay case the TURN server's
relayed address is 127.0.0.1. One relay candidate line was added to CHROMIUM_SDP_ALL (with
the related address Chromium gives it when not relay-only) so that it holds every kind."""

CHROMIUM_RELAY = (
    "candidate:1610922268 1 udp 50339839 127.0.0.1 49149 typ relay raddr 0.0.0.0 rport 0 "
    "generation 0 ufrag mTj9 network-cost 999"
)
CHROMIUM_HOST = (
    "candidate:284322117 1 udp 2113937151 192.0.2.2 39848 typ host generation 0 ufrag cp3x network-cost 999"
)
CHROMIUM_HOST6 = (
    "candidate:3683952805 1 udp 2113942271 fd00::2 52325 typ host generation 0 ufrag cp3x network-cost 999"
)
CHROMIUM_SRFLX = (
    "candidate:179753206 1 udp 1677729535 127.0.0.1 39848 typ srflx raddr 192.0.2.2 rport 39848 "
    "generation 0 ufrag cp3x network-cost 999"
)
# pc.localDescription once candidates were gathered with iceTransportPolicy "all": the host's
# address is in c=, in the m= port and in the candidates.
CHROMIUM_SDP_ALL = (
    "v=0\r\no=- 6210088641955253113 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "a=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n"
    "m=application 39848 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 192.0.2.2\r\n"
    "a=candidate:284322117 1 udp 2113937151 192.0.2.2 39848 typ host generation 0 network-cost 999\r\n"
    "a=candidate:3683952805 1 udp 2113942271 fd00::2 52325 typ host generation 0 network-cost 999\r\n"
    "a=candidate:179753206 1 udp 1677729535 127.0.0.1 39848 typ srflx raddr 192.0.2.2 rport 39848 "
    "generation 0 network-cost 999\r\n"
    "a=candidate:1610922268 1 udp 50339839 198.51.100.7 49149 typ relay raddr 192.0.2.2 rport 39848 "
    "generation 0 network-cost 999\r\n"
    "a=ice-ufrag:cp3x\r\na=ice-pwd:9bQV1wT3oTuL4emLEvvkpTjx\r\na=ice-options:trickle\r\n"
    "a=fingerprint:sha-256 77:78:5E:DE:E8:0E:53:5D:C0:89:3A:80:D4:1E:D4:B3:9E:8C:67:19:59:A5:6F:89:86:"
    "15:14:FB:02:F8:41:87\r\na=setup:actpass\r\na=mid:0\r\na=sctp-port:5000\r\n"
    "a=max-message-size:262144\r\n"
)
# The same with relay-only: Chromium already blanks raddr; the c= address is the relay's.
CHROMIUM_SDP_RELAY = (
    "v=0\r\no=- 3882282144205245727 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
    "a=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n"
    "m=application 49149 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 127.0.0.1\r\n"
    "a=candidate:1610922268 1 udp 50339839 127.0.0.1 49149 typ relay raddr 0.0.0.0 rport 0 "
    "generation 0 network-cost 999\r\n"
    "a=ice-ufrag:mTj9\r\na=ice-pwd:dKVEGVfW056lXAuC38eBIjmW\r\na=ice-options:trickle\r\n"
    "a=setup:actpass\r\na=mid:0\r\na=sctp-port:5000\r\na=max-message-size:262144\r\n"
)
OWN_ADDRESSES = ("192.0.2.2", "fd00::2")
