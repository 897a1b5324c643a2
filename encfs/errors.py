"""Domain exceptions for encfs: every failure a caller must tell apart has its own type.

Nothing here knows about FUSE, errno or exit codes: ``fs/ops.py`` maps these to errno
values and ``encfs.cli`` maps them to exit codes. Messages must never contain key bytes,
tokens or plaintext; they name files, blocks, URLs and what the operator should do.
"""

from __future__ import annotations


class EncfsError(Exception):
    """Base of every error encfs raises on purpose. ``hint`` (may be empty) tells the
    operator what to do; the CLI prints it on a line of its own."""

    hint: str = ""

    def __init__(self, *args: object, hint: str = "") -> None:
        if hint:
            self.hint = hint
        super().__init__(*args)


# --- on-disk format -------------------------------------------------------------------------


class FormatError(EncfsError):
    """The volume's on-disk data is not valid encfs format v1 (structure, not authentication)."""


class UnsupportedFormat(FormatError):
    """The volume was written by a format version or with feature flags this build refuses."""


class VolumeNotFound(FormatError):
    """The cipher directory has no volume header (not initialised, or the wrong directory)."""


class HeaderMissing(VolumeNotFound):
    """The volume header is gone from a cipher dir that still holds an encfs volume (its
    directory ids are there): restore a header backup; ``encfs init`` would need the
    directory emptied, and a new volume key cannot read the old ciphertext."""


class HeaderDamaged(FormatError):
    """The volume header parses but is not one encfs wrote for this volume (a field that
    never changes after ``init`` differs from the host's pin or from the header's own other
    fields): refused before anything is sent to the vault."""


class VolumeExists(EncfsError):
    """``init`` was pointed at a directory that already holds a volume or other files."""


class UnsafeCipherDir(EncfsError):
    """The cipher dir is not root-owned mode 0700 although encfs runs as root: anyone who can
    write into it could plant links and files for the daemon to follow."""


class VolumeBusy(EncfsError):
    """Another encfs process holds the cipher dir (a mount, or a repair): two writers on one
    cipher dir lose data without an error."""


class RekeyUnderWay(VolumeBusy):
    """A rekey (``encfs rekey``) of the volume is under way and must finish before this
    operation (KEK rotation, a second rekey started elsewhere)."""


class VolumeMismatch(EncfsError):
    """The cipher dir holds another volume (other id or other volume key) than the one this
    host pinned for it: a substituted header. Re-pinning is a deliberate act."""


# --- integrity --------------------------------------------------------------------------------


class IntegrityError(EncfsError):
    """Authentication failed: the ciphertext was modified, swapped, truncated or is corrupt.

    Attributes name what failed so the single log line and ``fsck`` can point at it.
    """

    def __init__(self, what: str, *, backing_path: str = "", block_no: int | None = None) -> None:
        self.what = what
        self.backing_path = backing_path
        self.block_no = block_no
        where = backing_path or "volume"
        if block_no is not None:
            where = f"{where} block {block_no}"
        super().__init__(f"integrity check failed: {what} ({where})")


class RekeyIncomplete(EncfsError):
    """A rekey walked the whole volume but some entries open under neither key; it did not
    finish (the retiring key stays) until they are repaired or removed."""


class HeaderAuthError(IntegrityError):
    """The volume header's authentication tag does not match (header edited or key mismatch)."""


# --- vault ------------------------------------------------------------------------------------


class VaultError(EncfsError):
    """A vault call failed. ``revoked`` tells whether it means the host lost access for good.
    ``kek`` is set (1 or 2) when the call was made for one KEK of a double-encrypted
    volume; the message then starts with it ("KEK 2: ...")."""

    revoked: bool = False
    kek: int | None = None

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message, hint=hint or type(self).hint)

    def for_kek(self, kek: int) -> VaultError:
        """Mark this error as coming from KEK ``kek`` (1 or 2); returns it."""
        self.kek = kek
        return self

    def __str__(self) -> str:
        text = super().__str__()
        return text if self.kek is None else f"KEK {self.kek}: {text}"


class VaultNotPinned(VaultError):
    """No vault address is configured on the host (``--vault``, the config file's
    ``VAULT=``, ``VAULT_ADDR``/``BAO_ADDR``): the header's URL alone is never trusted with a
    credential, because anyone who can edit the cipher dir can change it."""


class VaultConfigError(VaultError):
    """The vault URL or client settings are invalid (scheme, host, http to a non-loopback host)."""

    hint = (
        "check the --vault URL and settings: transit+https://HOST:PORT/MOUNT/KEY (transit+http "
        "only on loopback) or kmip://HOST:PORT/KEY-ID"
    )


class VaultCredentialsError(VaultError):
    """No usable host credential: token file missing, unreadable or too permissive."""

    hint = "give the host token with --token-file FILE (mode 0600) or VAULT_TOKEN/BAO_TOKEN"


class VaultPermissionDenied(VaultError):
    """The vault answered 403: token revoked or expired, or its policy does not allow the call."""

    revoked = True
    hint = "the host token is revoked, expired, or its policy lacks this capability on the key"


class VaultKeyNotFound(VaultError):
    """The KEK named in the volume does not exist in the vault (deleted, or wrong name/mount)."""

    revoked = True
    hint = "check the key name and transit mount; a deleted KEK cannot be recovered"


class VaultKeyDisabled(VaultError):
    """The KEK exists but may not be used: soft-deleted (OpenBao) or not Active (KMIP)."""

    revoked = True
    hint = "restore the key in the vault (OpenBao: POST transit/keys/KEY/soft-delete-restore)"


class VaultKeyVersionRetired(VaultError):
    """The KEK version that wrapped the volume key is below the key's min_decryption_version."""

    revoked = True
    hint = (
        "the volume key is wrapped with a KEK version the vault has retired: restore that "
        "version (lower min_decryption_version on the key, or use a vault that still has "
        "it), run `encfs rotate CIPHERDIR` to re-wrap under the newest version, then retire "
        "the old version again"
    )


class VaultSealed(VaultError):
    """The vault answered 503: it is sealed (restarting, or stopped by an operator)."""

    hint = "unseal the vault (bao operator unseal) and retry"


class VaultUnreachable(VaultError):
    """No answer from the vault: connection refused, DNS failure or timeout."""

    hint = "check that the vault is running and reachable from this host (address, port, firewall)"


class VaultTLSError(VaultError):
    """The TLS handshake with the vault failed (unknown CA, wrong host name, bad client cert)."""

    hint = "check --ca-file and the vault's certificate (host name, expiry)"


class VaultProtocolError(VaultError):
    """The vault answered something encfs does not understand (wrong endpoint, bad ciphertext)."""

    hint = "check that the URL points at a transit mount of Vault or OpenBao"


class VaultCiphertextRejected(VaultProtocolError):
    """The vault answered, and refused to unwrap the ciphertext it was given (transit
    ``decrypt`` HTTP 400, or a local unwrap that fails authentication): the ciphertext is
    damaged, or was not made by this key (a key deleted and re-created under its name)."""

    hint = (
        "the ciphertext is damaged or was made by another key (a key deleted and re-created "
        "under the same name cannot unwrap what the old one wrapped)"
    )


class WrappedKeyRejected(VaultCiphertextRejected):
    """The wrapped key in a structurally valid volume header does not unwrap with the KEK
    the host uses: the header is damaged, or the KEK was re-created. ``hint`` says whether
    ``encfs.volume.prev`` unwraps (``encfs header restore``)."""

    hint = (
        "restore the header from a backup (encfs header restore CIPHERDIR FILE), or check "
        "that the vault's key is the one that wrapped this volume's key"
    )


class BaoServerError(VaultError):
    """The local OpenBao server (``encfs vault dev`` / ``serve``) could not be started,
    initialised or unsealed."""

    hint = "see the OpenBao log lines above; the data directory is left as it was"


# --- daemon / mount ----------------------------------------------------------------------------


class MountError(EncfsError):
    """The mount could not be set up: bad mount point, FUSE unavailable, already mounted."""


class VolumeSuspended(EncfsError):
    """The daemon holds no keys right now (vault access withdrawn); operations are refused."""


class VolumeRevoked(EncfsError):
    """The daemon unmounted the volume because the vault revoked access (``--on-revoke
    unmount``); it exits with its own code so that a service manager does not restart it."""
