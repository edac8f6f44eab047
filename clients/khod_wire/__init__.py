"""khod_wire: what the daemon and every participant share, and nothing else.

- :mod:`khod_wire.protocol`: topics, message models, the state sets, the version;
- :mod:`khod_wire.identity`: what names, compatibles, hosts and instances may be
  (stdlib only), and how an instance is written in a fragment;
- :mod:`khod_wire.errors`: the error families, with the stable codes of replies;
- :mod:`khod_wire.fdt`: the libfdt layer (writer, checked reader), and the one place
  libfdt's errors become khod's;
- :mod:`khod_wire.dts`: dts-like text of a checked blob, for people;
- :mod:`khod_wire.fragment`: a fragment, built by a participant and checked by the daemon;
- :mod:`khod_wire.urls`: where the broker is and the credentials to log in (stdlib only);
- :mod:`khod_wire.message`: khod's own Message, Will and Publication (stdlib only);
- :mod:`khod_wire.reasons`: the broker's reason codes and the errors they become;
- :mod:`khod_wire.inbound`: the byte-bounded queue of received messages;
- :mod:`khod_wire._mqtt`: the client layer, the one module that imports aiomqtt and paho;
- :mod:`khod_wire.transport`: the reconnecting connection (publish, request/response).

``tests/unit/test_layers.py`` checks the import rules.

Neither the daemon (``khod``) nor the SDK (``khod_client``) is imported from here.
"""
