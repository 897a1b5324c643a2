"""The local OpenBao helper: run and provision an OpenBao for a host that has none.

encfs does not write a key server: OpenBao is the vault. This package makes it one command
to have one on a single host, and to give a host its least-privilege token:

- ``process``: find, start, supervise and stop the ``bao`` binary;
- ``dev`` (``encfs vault dev``): ``bao server -dev`` in memory on loopback, for demos and
  tests;
- ``serve`` (``encfs vault serve``, ``systemd/encfs-vault.service``): a persistent OpenBao
  with Raft storage, TLS with a CA of its own, auto-unsealed from its data directory (the
  trade-off is in its docstring);
- ``setup`` (``encfs vault setup``): provision a host on any Vault / OpenBao.

It reaches its servers only through the vault package's admin client
(``encfs.vault.admin``, on the same wire as the transit client). Nothing here prints or
picks an exit code: the functions return results or raise ``encfs.errors`` types, and
``encfs.cli`` tells the operator. Tokens and unseal keys are never printed or logged, except
the dev server's root token, which ``encfs vault dev`` prints on purpose.
"""
