"""khod_wire: what the daemon and every participant share, and nothing else.

- :mod:`khod_wire.protocol`: topics, message models, the state sets, the version;
- :mod:`khod_wire.identity`: what names, compatibles, hosts and instances may be
  (stdlib only), and how an instance is written in a fragment;
- :mod:`khod_wire.errors`: the error families, with the stable codes of replies;
- :mod:`khod_wire.fdt`: the libfdt layer (writer, checked reader), and the one place
  libfdt's errors become khod's;
- :mod:`khod_wire.dts`: dts-like text of a checked blob, for people;
- :mod:`khod_wire.fragment`: a fragment, built by a participant and checked by the daemon;
- :mod:`khod_wire.transport`: the MQTT connection (the one module that talks aiomqtt).

Neither the daemon (``khod``) nor the SDK (``khod_client``) is imported from here.
"""
