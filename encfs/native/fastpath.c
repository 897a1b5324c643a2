/*
 * fastpath.c - encfs's native I/O path: serve the hot FUSE requests of open regular files
 * in C, on libfuse's worker thread, without entering Python.
 *
 * Why: a cold 4 KiB READ through Python costs ~27 us of user CPU (ctypes entry, the
 * operations, CipherFile) against gocryptfs's ~7 (docs/BENCHMARKS.md, issue 16). This file
 * puts its own callbacks into libfuse's operations table (high-level API) in front of
 * mfusepy's ctypes thunks into encfs.fs.binding: fp_read, fp_write, fp_getattr and
 * fp_getxattr serve the plain happy path and hand everything else to the callback they
 * replaced, with the same arguments, so errors, logging, holes and EIO keep their one home
 * in Python.
 *
 * The happy path, all of which must hold (else: the Python callback):
 *   - the native path is open (the gate, shut while the volume is suspended or a rekey
 *     pauses it: fp_gate_close) and the handle `fh` (= the backing fd) is mapped to an
 *     entry that knows its file id and holds a cipher context (Python makes a file's entry
 *     once it pays off and maps its fds; keys.py keys it; fp_wipe removes every context);
 *   - no writer is changing the file (`seq` even) and none queued a deferred write
 *     (`queued` 0), before and after (a seqlock, see struct fp_file);
 *   - READ: it starts and ends on block boundaries, at most FP_MAX_IO bytes, and every
 *     block read is whole and authenticates (a hole, a short last block, a torn or tampered
 *     block, an I/O error: Python redoes the read and answers for it);
 *   - WRITE: it covers whole blocks that already exist whole (no size change, no partial
 *     block, no new file), less than FP_MAX_WRITE bytes (longer ones may be stream writes
 *     for Python's Sealer), the file's lock is free, and nothing asks Python to see the
 *     write (set-ID bits to clear, other names to invalidate, a deferred error to
 *     report, a read-only mount);
 *   - GETATTR: by handle (fstat of the backing fd, plaintext size); GETXATTR: a name
 *     outside user.* (the kernel's security.capability probe) is answered here.
 *
 * Besides libfuse's callbacks, one service for Python: fp_file_seal seals the whole
 * blocks of a stream write for Python's Sealer (encfs/cipherfile.py), which writes them;
 * one call per job with the GIL released, instead of a pyca call per block and layer.
 *
 * Layout (docs/FORMAT.md section 5, as encfs/crypto.py BlockCipher): block n of B plaintext
 * bytes is at cipher offset 18 + n*(B+28): nonce(12) || AES-256-GCM(ct) || tag(16), with
 * associated data file_id(16) || u64be(n), a fresh random nonce per write. On a DOUBLE
 * volume (section 5.2) that inner block is sealed again, whole, with ChaCha20-Poly1305
 * under the outer per-file key, its own fresh nonce and the same associated data: block n
 * is at 18 + n*(B+56), nonce2(12) || ChaCha20-Poly1305(inner block) || tag2(16). OpenSSL's
 * libcrypto does the AEADs and the nonces: the same algorithms, no cryptography of our own.
 *
 * The cipher dir is hostile input: every length and offset is bounded here, and nothing
 * but a file already opened by encfs/backing.py (a regular file) is ever read or written.
 *
 * Memory ordering: Python stores `seq`, `queued`, `py_setid` and `py_error` with plain
 * stores (under the file's locks); this relies on x86-64's ordered stores (TSO), and
 * encfs/fastpath.py refuses to load this library on other machines.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#define FP_API __attribute__((visibility("default"))) /* what fastpath.py calls */

#define FP_VERSION 6             /* fastpath.py checks it: a stale build is not used */
#define FP_HEADER_LEN 18         /* file header: version(2) || file_id(16) */
#define FP_NONCE_LEN 12
#define FP_TAG_LEN 16
#define FP_OVERHEAD (FP_NONCE_LEN + FP_TAG_LEN) /* per layer; fp.overhead: per block */
#define FP_KEY_LEN 32
#define FP_FILE_ID_LEN 16
#define FP_MIN_BLOCK 4096
#define FP_MAX_BLOCK 65536
#define FP_MAX_IO (1u << 20)     /* libfuse's max_read/max_write as encfs negotiates them */
#define FP_MAX_WRITE (128u << 10) /* cipherfile.STREAM_MIN: longer writes are Python's */
#define FP_SLOTS 4               /* cipher contexts per file: concurrent users of one file */

/* Operations fp_plug knows. */
enum { FP_OP_READ, FP_OP_WRITE, FP_OP_GETATTR, FP_OP_GETXATTR, FP_NOPS };

typedef int (*fp_read_fn)(const char *, char *, size_t, off_t, void *);
typedef int (*fp_write_fn)(const char *, const char *, size_t, off_t, void *);
typedef int (*fp_getattr_fn)(const char *, struct stat *, void *);
typedef int (*fp_getxattr_fn)(const char *, const char *, char *, size_t);

/*
 * One open backing inode (a CipherFile in Python; hard links share it), made and freed
 * by Python (fp_file_new at the inode's first open, fp_file_free at its last close).
 *
 * The seqlock: a writer (Python's or fp_write) makes `seq` odd before it changes the
 * file's content or size and even again after; `queued` counts deferred writes waiting in
 * Python's Sealer. A reader samples both before and after its pread and decryption and
 * serves only if `seq` was even and unchanged and `queued` 0: a write that returned
 * before the second sample changed `seq` or is still queued, so no block older than it
 * is ever returned after it (nor a mix of blocks from both sides of it).
 *
 * `lock` orders the writers with each other and with Python's readers, which do not use
 * the seqlock: Python takes it around every locked section of a CipherFile (fp_file_lock),
 * fp_write only tries it and hands the write to Python if it is taken.
 *
 * Cipher contexts live in `slot`s, each used by one thread at a time (`busy`). Whoever
 * drops them (fp_file_set_id, fp_wipe, fp_file_free) first claims every slot, so no
 * context is freed under a user.
 */
struct fp_file {
	_Atomic uint64_t seq;      /* offset 0: Python addresses these four (fastpath.py) */
	_Atomic uint64_t queued;   /* offset 8 */
	/* Python must see this file's writes: */
	_Atomic uint32_t py_setid; /* offset 16: set-ID bits may need clearing after a write */
	_Atomic uint32_t py_error; /* offset 20: a deferred write failed; the next reports it */
	pthread_mutex_t lock;
	pthread_mutex_t mu;        /* guards `master` and making slot contexts from it */
	EVP_CIPHER_CTX *master;    /* keyed template; never used to encrypt or decrypt */
	EVP_CIPHER_CTX *outer_master; /* the same for the outer layer (DOUBLE), else NULL */
	struct {
		atomic_int busy;
		EVP_CIPHER_CTX *ctx;
		EVP_CIPHER_CTX *outer;  /* DOUBLE only */
	} slot[FP_SLOTS];
	int has_id;                /* changed only while every slot is claimed */
	unsigned char file_id[FP_FILE_ID_LEN];
	struct fp_file *prev, *next; /* every live entry, for fp_wipe (fp.files_mu) */
};

/*
 * The one mount this process serves: libfuse's high-level callbacks take no user
 * argument, and an encfs daemon serves exactly one mount. fp_setup resets it.
 */
static struct {
	void *fallback[FP_NOPS];   /* the Python callbacks (mfusepy's thunks) */
	size_t fh_offset;          /* offsetof(struct fuse_file_info, fh), from the binding */
	uint32_t block_size;
	uint32_t overhead;         /* per block: FP_OVERHEAD, twice that on a DOUBLE volume */
	int double_;               /* DOUBLE: two layers (the outer one ChaCha20-Poly1305) */
	int read_only;
	int foreign_errno;         /* what a getxattr outside user.* answers */
	size_t page_size;          /* the page cache's unit, for prefetch_edges */
	_Atomic(struct fp_file *) *fds; /* fd -> entry; NULL: not served natively */
	size_t nfds;
	atomic_int open;           /* the suspension gate, as Python's fs.kcache.Gate */
	atomic_int aliases;        /* some file has other names to invalidate: writes to Python */
	atomic_long inflight;      /* native requests inside the gate */
	atomic_ulong counter[7];
	void (*between)(void);     /* tests only: runs where a write can race a native read */
	pthread_mutex_t files_mu;
	struct fp_file *files;
} fp = {.files_mu = PTHREAD_MUTEX_INITIALIZER};

enum { C_READS, C_READ_BYTES, C_WRITES, C_WRITE_BYTES, C_PROBES, C_FALLBACKS, C_SEALED, C_NCOUNTERS };

static pthread_key_t buf_key;
static pthread_once_t buf_once = PTHREAD_ONCE_INIT;

static void buf_free(void *p) { free(p); }
static void buf_key_make(void) { (void)pthread_key_create(&buf_key, buf_free); }

/* This thread's buffer for ciphertext (nothing secret), at least `len` bytes. */
static unsigned char *thread_buffer(size_t len)
{
	struct tbuf { size_t cap; unsigned char data[]; } *b;
	(void)pthread_once(&buf_once, buf_key_make);
	b = pthread_getspecific(buf_key);
	if (b == NULL || b->cap < len) {
		free(b);
		b = malloc(sizeof(*b) + len);
		if (b == NULL) {
			(void)pthread_setspecific(buf_key, NULL);
			return NULL;
		}
		b->cap = len;
		(void)pthread_setspecific(buf_key, b);
	}
	return b->data;
}

static void count(int which, unsigned long n) { atomic_fetch_add(&fp.counter[which], n); }

/* ---- setup, gate, counters (called from encfs/fastpath.py) ---------------------------- */

FP_API int fp_version(void) { return FP_VERSION; }

/*
 * Reset the mount state (once per process, before libfuse serves): block size, whether
 * the volume is DOUBLE, read-only, the errno of a getxattr outside user.*; `nfds` bounds
 * the fds that can be served.
 */
FP_API int fp_setup(uint32_t block_size, int double_, int read_only, int foreign_errno,
		    size_t nfds)
{
	if (block_size < FP_MIN_BLOCK || block_size > FP_MAX_BLOCK || block_size % FP_MIN_BLOCK)
		return -EINVAL;
	if (nfds == 0 || nfds > (1u << 24) || foreign_errno <= 0)
		return -EINVAL;
	free((void *)fp.fds);
	fp.fds = calloc(nfds, sizeof(*fp.fds));
	if (fp.fds == NULL)
		return -ENOMEM;
	fp.nfds = nfds;
	fp.block_size = block_size;
	fp.double_ = double_ != 0;
	fp.overhead = fp.double_ ? 2 * FP_OVERHEAD : FP_OVERHEAD;
	fp.read_only = read_only;
	fp.foreign_errno = foreign_errno;
	fp.page_size = sysconf(_SC_PAGESIZE) > 0 ? (size_t)sysconf(_SC_PAGESIZE) : 4096;
	memset(fp.fallback, 0, sizeof(fp.fallback));
	fp.between = NULL;
	for (int i = 0; i < C_NCOUNTERS; i++)
		atomic_store(&fp.counter[i], 0);
	atomic_store(&fp.aliases, 0);
	atomic_store(&fp.open, 1);
	return 0;
}

FP_API int fp_read(const char *, char *, size_t, off_t, void *);
FP_API int fp_write(const char *, const char *, size_t, off_t, void *);
FP_API int fp_getattr(const char *, struct stat *, void *);
FP_API int fp_getxattr(const char *, const char *, char *, size_t);

/*
 * Put the native callback for operation `op` (FP_OP_*) in front of `fallback`, the
 * callback it replaces; returns the native callback for libfuse's table (NULL: unknown op).
 * `fh_offset`: where libfuse's struct fuse_file_info keeps fh (the binding knows).
 * Called before libfuse starts serving.
 */
FP_API void *fp_plug(int op, void *fallback, size_t fh_offset)
{
	static void *const native[FP_NOPS] = {
		[FP_OP_READ] = (void *)fp_read,
		[FP_OP_WRITE] = (void *)fp_write,
		[FP_OP_GETATTR] = (void *)fp_getattr,
		[FP_OP_GETXATTR] = (void *)fp_getxattr,
	};
	if (op < 0 || op >= FP_NOPS || fallback == NULL)
		return NULL;
	fp.fallback[op] = fallback;
	fp.fh_offset = fh_offset;
	return native[op];
}

FP_API void fp_gate_open(void) { atomic_store(&fp.open, 1); }

/* Shut the gate and wait until no native request is inside (1), or `timeout_ms` passed (0). */
FP_API int fp_gate_close(long timeout_ms)
{
	struct timespec tick = {0, 200000};
	long waited_us = 0;
	atomic_store(&fp.open, 0);
	while (atomic_load(&fp.inflight) > 0) {
		if (waited_us >= timeout_ms * 1000)
			return 0;
		nanosleep(&tick, NULL);
		waited_us += 200;
	}
	return 1;
}

/* Some file has other names whose caches Python invalidates after a write (or none has). */
FP_API void fp_set_aliases(int any) { atomic_store(&fp.aliases, any != 0); }

/*
 * Tests only (tests/test_fastpath.py): `between` runs in every native read after its
 * blocks were read and decrypted and before it checks the seqlock again, so that a test
 * can put a write exactly there. NULL (the default, and fp_setup's) runs nothing.
 */
FP_API void fp_test_between(void (*between)(void)) { fp.between = between; }

FP_API void fp_counters(unsigned long out[C_NCOUNTERS])
{
	for (int i = 0; i < C_NCOUNTERS; i++)
		out[i] = atomic_load(&fp.counter[i]);
}

/* ---- file entries ---------------------------------------------------------------------- */

FP_API struct fp_file *fp_file_new(void)
{
	struct fp_file *f = calloc(1, sizeof(*f));
	if (f == NULL)
		return NULL;
	if (pthread_mutex_init(&f->lock, NULL) != 0) {
		free(f);
		return NULL;
	}
	if (pthread_mutex_init(&f->mu, NULL) != 0) {
		pthread_mutex_destroy(&f->lock);
		free(f);
		return NULL;
	}
	pthread_mutex_lock(&fp.files_mu);
	f->next = fp.files;
	if (fp.files)
		fp.files->prev = f;
	fp.files = f;
	pthread_mutex_unlock(&fp.files_mu);
	return f;
}

static void release_slots(struct fp_file *f, int n)
{
	for (int i = 0; i < n; i++)
		atomic_store(&f->slot[i].busy, 0);
}

/*
 * Claim every slot, so that no context is in use: 1. A slot in use (a native request in
 * flight) is waited for if `wait`; else nothing stays claimed and 0 is returned.
 */
static int claim_slots(struct fp_file *f, int wait)
{
	for (int i = 0; i < FP_SLOTS; i++) {
		int expected = 0;
		while (!atomic_compare_exchange_weak(&f->slot[i].busy, &expected, 1)) {
			if (!wait && expected != 0) {
				release_slots(f, i);
				return 0;
			}
			expected = 0;
			sched_yield();
		}
	}
	return 1;
}

/* Free (and so cleanse: OpenSSL does) every context. Caller claimed every slot. */
static void drop_contexts(struct fp_file *f)
{
	pthread_mutex_lock(&f->mu);
	for (int i = 0; i < FP_SLOTS; i++) {
		EVP_CIPHER_CTX_free(f->slot[i].ctx);
		EVP_CIPHER_CTX_free(f->slot[i].outer);
		f->slot[i].ctx = NULL;
		f->slot[i].outer = NULL;
	}
	EVP_CIPHER_CTX_free(f->master);
	EVP_CIPHER_CTX_free(f->outer_master);
	f->master = NULL;
	f->outer_master = NULL;
	pthread_mutex_unlock(&f->mu);
}

/*
 * The file's id (NULL: it has none, an empty file): drops the contexts of the old one.
 * Called by Python whenever the id it knows changes (first read of the header, a new
 * header, truncation to 0), with the file's lock held. With a native read of the file
 * in flight: waits for it if `wait`, else changes nothing and returns -EBUSY (Python
 * then calls again with `wait`, its GIL released). 0 when done.
 */
FP_API int fp_file_set_id(struct fp_file *f, const unsigned char *file_id, int wait)
{
	if (!claim_slots(f, wait))
		return -EBUSY;
	drop_contexts(f);
	f->has_id = file_id != NULL;
	if (file_id != NULL)
		memcpy(f->file_id, file_id, FP_FILE_ID_LEN);
	release_slots(f, FP_SLOTS);
	return 0;
}

/* A context of `cipher` keyed with `key`, or NULL. */
static EVP_CIPHER_CTX *keyed_context(const EVP_CIPHER *cipher, const unsigned char *key)
{
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	if (ctx == NULL || EVP_CipherInit_ex(ctx, cipher, NULL, key, NULL, 0) != 1) {
		EVP_CIPHER_CTX_free(ctx);
		return NULL;
	}
	return ctx;
}

/*
 * Key the entry for file id `file_id` from the key at `key` (keys.py's locked arena; not
 * kept: only OpenSSL's contexts hold the schedules): 32 bytes, the per-file key; on a
 * DOUBLE volume 64, the per-file key then the outer per-file key. Returns 0, or -errno.
 * No-op if keyed; -ESTALE if the entry's id is another (it changed meanwhile). Called
 * with the file's lock held (as fp_file_set_id is: the id cannot change meanwhile).
 */
FP_API int fp_file_set_key(struct fp_file *f, const unsigned char *file_id,
			   const unsigned char *key)
{
	int rc = 0;
	if (!f->has_id || memcmp(f->file_id, file_id, FP_FILE_ID_LEN) != 0)
		return -ESTALE;
	pthread_mutex_lock(&f->mu);
	if (f->master == NULL) {
		EVP_CIPHER_CTX *inner = keyed_context(EVP_aes_256_gcm(), key);
		EVP_CIPHER_CTX *outer = NULL;
		if (inner != NULL && fp.double_)
			outer = keyed_context(EVP_chacha20_poly1305(), key + FP_KEY_LEN);
		if (inner == NULL || (fp.double_ && outer == NULL)) {
			EVP_CIPHER_CTX_free(inner);
			EVP_CIPHER_CTX_free(outer);
			rc = -EIO;
		} else {
			f->master = inner;
			f->outer_master = outer;
		}
	}
	pthread_mutex_unlock(&f->mu);
	return rc;
}

/* The file's lock (struct fp_file), for Python's readers and writers: trylock first
 * (0: taken) without giving up Python's GIL; lock when it is contended, with the GIL
 * released (a Python holder may need the GIL to let go). */
FP_API int fp_file_trylock(struct fp_file *f) { return pthread_mutex_trylock(&f->lock); }
FP_API void fp_file_lock(struct fp_file *f) { pthread_mutex_lock(&f->lock); }
FP_API void fp_file_unlock(struct fp_file *f) { pthread_mutex_unlock(&f->lock); }

/* Serve `fd`'s requests from `f` (NULL: stop). Python maps an fd only while it is open. */
FP_API int fp_map_fd(int fd, struct fp_file *f)
{
	if (fd < 0 || (size_t)fd >= fp.nfds)
		return -EBADF;
	atomic_store_explicit(&fp.fds[fd], f, memory_order_release);
	return 0;
}

/* Forget the entry: no fd maps to it any more (the inode's last close). */
FP_API void fp_file_free(struct fp_file *f)
{
	if (f == NULL)
		return;
	pthread_mutex_lock(&fp.files_mu);
	if (f->prev)
		f->prev->next = f->next;
	else
		fp.files = f->next;
	if (f->next)
		f->next->prev = f->prev;
	pthread_mutex_unlock(&fp.files_mu);
	claim_slots(f, 1); /* nothing in flight: every fd of it is closed */
	drop_contexts(f);
	pthread_mutex_destroy(&f->mu);
	pthread_mutex_destroy(&f->lock);
	OPENSSL_cleanse(f, sizeof(*f));
	free(f);
}

/*
 * Drop every cipher context (suspension, unmount) once no native request is in flight;
 * the gate is then as it was. Returns 1, or 0 if requests were still inside after
 * `timeout_ms` (nothing dropped then, and the gate stays shut: the caller logs it).
 */
FP_API int fp_wipe(long timeout_ms)
{
	int was_open = atomic_exchange(&fp.open, 0);
	if (!fp_gate_close(timeout_ms))
		return 0;
	pthread_mutex_lock(&fp.files_mu);
	for (struct fp_file *f = fp.files; f != NULL; f = f->next) {
		claim_slots(f, 1); /* nothing in flight: the gate is shut and drained */
		drop_contexts(f);
		release_slots(f, FP_SLOTS);
	}
	pthread_mutex_unlock(&fp.files_mu);
	atomic_store(&fp.open, was_open);
	return 1;
}

/* ---- serving ----------------------------------------------------------------------------- */

/* A copy of the keyed template `master`, or NULL. */
static EVP_CIPHER_CTX *copy_context(const EVP_CIPHER_CTX *master)
{
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	if (ctx != NULL && EVP_CIPHER_CTX_copy(ctx, master) == 1)
		return ctx;
	EVP_CIPHER_CTX_free(ctx);
	return NULL;
}

/* A slot with a context (two on a DOUBLE volume) for `f` (claimed: release_slot after
 * use), or -1. */
static int grab_slot(struct fp_file *f)
{
	for (int i = 0; i < FP_SLOTS; i++) {
		int expected = 0;
		if (!atomic_compare_exchange_strong(&f->slot[i].busy, &expected, 1))
			continue;
		if (f->slot[i].ctx == NULL && f->has_id) {
			pthread_mutex_lock(&f->mu);
			if (f->master != NULL) {
				EVP_CIPHER_CTX *ctx = copy_context(f->master);
				EVP_CIPHER_CTX *outer = NULL;
				if (ctx != NULL && f->outer_master != NULL)
					outer = copy_context(f->outer_master);
				if (ctx != NULL && (f->outer_master == NULL || outer != NULL)) {
					f->slot[i].ctx = ctx;
					f->slot[i].outer = outer;
				} else {
					EVP_CIPHER_CTX_free(ctx);
				}
			}
			pthread_mutex_unlock(&f->mu);
		}
		if (f->slot[i].ctx != NULL && f->has_id)
			return i;
		atomic_store(&f->slot[i].busy, 0);
		return -1;
	}
	return -1;
}

static void release_slot(struct fp_file *f, int i) { atomic_store(&f->slot[i].busy, 0); }

static void block_ad(unsigned char ad[FP_FILE_ID_LEN + 8], const unsigned char *file_id,
		     uint64_t block_no)
{
	memcpy(ad, file_id, FP_FILE_ID_LEN);
	for (int i = 0; i < 8; i++)
		ad[FP_FILE_ID_LEN + i] = (unsigned char)(block_no >> (56 - 8 * i));
}

/* Open one layer, `in` = nonce || ciphertext (len bytes) || tag: 1 if it authenticates
 * (its plaintext in `out`), else 0. */
static int open_layer(EVP_CIPHER_CTX *ctx, const unsigned char ad[FP_FILE_ID_LEN + 8],
		      const unsigned char *in, unsigned char *out, int len)
{
	unsigned char tag[FP_TAG_LEN];
	int n;
	memcpy(tag, in + FP_NONCE_LEN + len, FP_TAG_LEN);
	return EVP_CipherInit_ex(ctx, NULL, NULL, NULL, in, 0) == 1
	       && EVP_CipherUpdate(ctx, NULL, &n, ad, FP_FILE_ID_LEN + 8) == 1
	       && EVP_CipherUpdate(ctx, out, &n, in + FP_NONCE_LEN, len) == 1
	       && n == len
	       && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, FP_TAG_LEN, tag) == 1
	       && EVP_CipherFinal_ex(ctx, out + n, &n) == 1;
}

/* Seal one layer of `len` bytes into `out` = nonce || ciphertext || tag: 1, or 0. */
static int seal_layer(EVP_CIPHER_CTX *ctx, const unsigned char ad[FP_FILE_ID_LEN + 8],
		      const unsigned char *in, unsigned char *out, int len)
{
	int n;
	return RAND_bytes(out, FP_NONCE_LEN) == 1
	       && EVP_CipherInit_ex(ctx, NULL, NULL, NULL, out, 1) == 1
	       && EVP_CipherUpdate(ctx, NULL, &n, ad, FP_FILE_ID_LEN + 8) == 1
	       && EVP_CipherUpdate(ctx, out + FP_NONCE_LEN, &n, in, len) == 1
	       && n == len
	       && EVP_CipherFinal_ex(ctx, out + FP_NONCE_LEN + n, &n) == 1
	       && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, FP_TAG_LEN,
				      out + FP_NONCE_LEN + len) == 1;
}

/*
 * Open one whole block of `plain_len` plaintext bytes: 1 if it authenticates (plaintext
 * in `out`), else 0. `outer` (DOUBLE only, else NULL) first opens the outer layer into
 * `inner_buf` (plain_len + FP_OVERHEAD bytes: the inner block, ciphertext still).
 */
static int open_block(EVP_CIPHER_CTX *ctx, EVP_CIPHER_CTX *outer, const unsigned char *file_id,
		      uint64_t block_no, const unsigned char *in, unsigned char *out,
		      int plain_len, unsigned char *inner_buf)
{
	unsigned char ad[FP_FILE_ID_LEN + 8];
	block_ad(ad, file_id, block_no);
	if (outer == NULL)
		return open_layer(ctx, ad, in, out, plain_len);
	return open_layer(outer, ad, in, inner_buf, plain_len + FP_OVERHEAD)
	       && open_layer(ctx, ad, inner_buf, out, plain_len);
}

/* Seal one whole block into `out` (its backing bytes): 1, or 0 on failure. `outer` and
 * `inner_buf` as for open_block. */
static int seal_block(EVP_CIPHER_CTX *ctx, EVP_CIPHER_CTX *outer, const unsigned char *file_id,
		      uint64_t block_no, const unsigned char *in, unsigned char *out,
		      int plain_len, unsigned char *inner_buf)
{
	unsigned char ad[FP_FILE_ID_LEN + 8];
	block_ad(ad, file_id, block_no);
	if (outer == NULL)
		return seal_layer(ctx, ad, in, out, plain_len);
	return seal_layer(ctx, ad, in, inner_buf, plain_len)
	       && seal_layer(outer, ad, inner_buf, out, plain_len + FP_OVERHEAD);
}

/* pread until `len` bytes or the end of the file; -1 on an error. */
static ssize_t pread_full(int fd, unsigned char *buf, size_t len, off_t off)
{
	size_t got = 0;
	while (got < len) {
		ssize_t n = pread(fd, buf + got, len - got, off + (off_t)got);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (n == 0)
			break;
		got += (size_t)n;
	}
	return (ssize_t)got;
}

/* pwrite all `len` bytes: 0, or -1 on an error. */
static int pwrite_full(int fd, const unsigned char *buf, size_t len, off_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pwrite(fd, buf + done, len - done, off + (off_t)done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (n == 0)
			return -1;
		done += (size_t)n;
	}
	return 0;
}

/*
 * Start reading the backing pages that a pwrite of [off, off+len) covers only in part:
 * the filesystem must read such a page before it can change part of it, and does so in
 * the pwrite, one page after the other. Asked for here, before the blocks are sealed,
 * both pages come in one request while the CPU seals (a cold 4 KiB block rewrite on this
 * machine's disk: ~110 -> ~65 us). A page already cached costs a lookup; an error is
 * ignored (the pwrite reads what it needs either way).
 */
static void prefetch_edges(int fd, off_t off, size_t len)
{
	const off_t page = (off_t)fp.page_size, end = off + (off_t)len;
	const off_t head = off - off % page, tail = end - end % page;
	const int partial_head = off % page != 0, partial_tail = end % page != 0;

	if (partial_head && partial_tail && tail - head <= page) /* one page, or two adjacent */
		(void)posix_fadvise(fd, head, tail + page - head, POSIX_FADV_WILLNEED);
	else {
		if (partial_head)
			(void)posix_fadvise(fd, head, page, POSIX_FADV_WILLNEED);
		if (partial_tail)
			(void)posix_fadvise(fd, tail, page, POSIX_FADV_WILLNEED);
	}
}

/* Tests only: prefetch_edges itself, to check which pages it asks for. */
FP_API void fp_test_prefetch_edges(int fd, int64_t off, size_t len)
{
	prefetch_edges(fd, (off_t)off, len);
}

/* Enter the gate and find fh's entry; NULL: not served here (leave() is still due). */
static struct fp_file *enter(uint64_t fh)
{
	atomic_fetch_add(&fp.inflight, 1);
	if (!atomic_load(&fp.open) || fh >= fp.nfds)
		return NULL;
	return atomic_load_explicit(&fp.fds[fh], memory_order_acquire);
}

static void leave(void) { atomic_fetch_sub(&fp.inflight, 1); }

static uint64_t fh_of(const void *fi)
{
	uint64_t fh;
	memcpy(&fh, (const char *)fi + fp.fh_offset, sizeof(fh));
	return fh;
}

/* Whether [off, off+size) is whole blocks, and which; 0 if not (or out of range). */
static int block_span(size_t size, off_t off, size_t max, uint64_t *first, size_t *nblocks)
{
	const size_t bs = fp.block_size, cbs = bs + fp.overhead;
	if (off < 0 || size == 0 || size > max || (uint64_t)off % bs || size % bs)
		return 0;
	*first = (uint64_t)off / bs;
	*nblocks = size / bs;
	/* the cipher offset of the end must fit an off_t */
	return *first <= ((uint64_t)INT64_MAX - FP_HEADER_LEN) / cbs - *nblocks;
}

/* The read, or -1: not the happy path (the caller hands it to Python). */
static int serve_read(uint64_t fh, char *buf, size_t size, off_t off)
{
	const size_t bs = fp.block_size, cbs = bs + fp.overhead;
	struct fp_file *f;
	uint64_t seq, first;
	size_t nblocks;
	ssize_t got;
	unsigned char *cipher;
	int slot, rc = -1;

	if (!block_span(size, off, FP_MAX_IO, &first, &nblocks))
		return -1;
	f = enter(fh);
	if (f == NULL)
		goto out;
	seq = atomic_load_explicit(&f->seq, memory_order_acquire);
	if (seq & 1 || atomic_load_explicit(&f->queued, memory_order_acquire))
		goto out;
	cipher = thread_buffer(nblocks * cbs + bs + FP_OVERHEAD); /* + an inner block */
	if (cipher == NULL)
		goto out;
	slot = grab_slot(f);
	if (slot < 0)
		goto out;
	got = pread_full((int)fh, cipher, nblocks * cbs, (off_t)(FP_HEADER_LEN + first * cbs));
	/* A partial last block (more than the overhead after the whole ones) goes to Python
	 * (short blocks need its stack scrub); 1..overhead trailing bytes hold no plaintext
	 * and are not read, as format.Geometry.plain_size says. */
	if (got >= 0 && (size_t)got % cbs <= fp.overhead) {
		size_t whole = (size_t)got / cbs;
		rc = (int)(whole * bs);
		for (size_t i = 0; i < whole && rc >= 0; i++)
			if (!open_block(f->slot[slot].ctx, f->slot[slot].outer, f->file_id, first + i,
					cipher + i * cbs, (unsigned char *)buf + i * bs, (int)bs,
					cipher + nblocks * cbs))
				rc = -1;
	}
	release_slot(f, slot);
	if (fp.between != NULL)
		fp.between();
	atomic_thread_fence(memory_order_acquire);
	if (atomic_load_explicit(&f->queued, memory_order_acquire)
	    || atomic_load_explicit(&f->seq, memory_order_acquire) != seq)
		rc = -1;
out:
	leave();
	return rc;
}

/* The write, or -1: not the happy path (nothing was written; Python does it). */
static int serve_write(uint64_t fh, const char *buf, size_t size, off_t off)
{
	const size_t bs = fp.block_size, cbs = bs + fp.overhead;
	struct fp_file *f;
	struct stat st;
	uint64_t first;
	size_t nblocks;
	unsigned char *cipher;
	int slot, rc = -1;

	if (fp.read_only || !block_span(size, off, FP_MAX_WRITE - 1, &first, &nblocks))
		return -1;
	f = enter(fh);
	if (f == NULL || atomic_load(&fp.aliases) || atomic_load(&f->py_setid)
	    || atomic_load(&f->py_error))
		goto out;
	if (pthread_mutex_trylock(&f->lock) != 0)
		goto out;
	if (atomic_load(&f->queued) || fstat((int)fh, &st) != 0 || st.st_size < FP_HEADER_LEN
	    || first + nblocks > (uint64_t)(st.st_size - FP_HEADER_LEN) / cbs)
		goto unlock; /* only blocks that exist whole: no size change */
	cipher = thread_buffer(nblocks * cbs + bs + FP_OVERHEAD); /* + an inner block */
	if (cipher == NULL)
		goto unlock;
	slot = grab_slot(f);
	if (slot < 0)
		goto unlock;
	prefetch_edges((int)fh, (off_t)(FP_HEADER_LEN + first * cbs), nblocks * cbs);
	rc = (int)size;
	for (size_t i = 0; i < nblocks && rc >= 0; i++)
		if (!seal_block(f->slot[slot].ctx, f->slot[slot].outer, f->file_id, first + i,
				(const unsigned char *)buf + i * bs, cipher + i * cbs, (int)bs,
				cipher + nblocks * cbs))
			rc = -1;
	release_slot(f, slot);
	if (rc >= 0) {
		atomic_fetch_add(&f->seq, 1); /* odd: readers keep off */
		if (pwrite_full((int)fh, cipher, nblocks * cbs,
				(off_t)(FP_HEADER_LEN + first * cbs)) != 0)
			rc = -1; /* Python writes it again, whole, and reports the error */
		atomic_fetch_add(&f->seq, 1);
	}
unlock:
	pthread_mutex_unlock(&f->lock);
out:
	leave();
	return rc;
}

/*
 * Seal `len` bytes of plaintext at `in` (whole blocks, the first block number `first`)
 * into `out` (`out_len` bytes, which must be len / B * (B + overhead)) for Python's
 * Sealer, which writes them (CipherFile.preseal): 0, or -errno and `out` is not to be
 * used (-ESTALE: the entry is keyed for another id than `file_id`, or not keyed;
 * -ESHUTDOWN: the gate is shut; -EINVAL: the lengths do not fit). Python calls it with
 * its GIL released; it touches neither the file nor the seqlock.
 */
FP_API int fp_file_seal(struct fp_file *f, const unsigned char *file_id, uint64_t first,
			const unsigned char *in, size_t len, unsigned char *out, size_t out_len)
{
	const size_t bs = fp.block_size, cbs = bs + fp.overhead;
	size_t nblocks;
	unsigned char *inner;
	int slot, rc = 0;

	if (f == NULL || len == 0 || len % bs || len > (64u << 20)
	    || out_len != len / bs * cbs || first > UINT64_MAX - len / bs)
		return -EINVAL;
	nblocks = len / bs;
	atomic_fetch_add(&fp.inflight, 1);
	if (!atomic_load(&fp.open)) {
		rc = -ESHUTDOWN;
		goto out;
	}
	inner = thread_buffer(bs + FP_OVERHEAD);
	if (inner == NULL) {
		rc = -ENOMEM;
		goto out;
	}
	slot = grab_slot(f); /* holding it, the id cannot change (fp_file_set_id) */
	if (slot < 0) {
		rc = -ESTALE;
		goto out;
	}
	if (memcmp(f->file_id, file_id, FP_FILE_ID_LEN) != 0)
		rc = -ESTALE;
	for (size_t i = 0; i < nblocks && rc == 0; i++)
		if (!seal_block(f->slot[slot].ctx, f->slot[slot].outer, f->file_id, first + i,
				in + i * bs, out + i * cbs, (int)bs, inner))
			rc = -EIO;
	release_slot(f, slot);
	if (rc == 0)
		count(C_SEALED, len);
out:
	leave();
	return rc;
}

/* getattr by handle, or -1. Python's EncfsOperations.stat(fh) and binding._fill_stat. */
static int serve_getattr(uint64_t fh, struct stat *out)
{
	const uint64_t cbs = fp.block_size + fp.overhead;
	struct fp_file *f = enter(fh);
	int rc = -1;
	if (f == NULL || atomic_load(&f->queued) || atomic_load(&f->seq) & 1)
		goto out;
	if (fstat((int)fh, out) != 0 || !S_ISREG(out->st_mode) || out->st_size < 0)
		goto out;
	if (out->st_size <= FP_HEADER_LEN) {
		out->st_size = 0;
	} else {
		uint64_t body = (uint64_t)out->st_size - FP_HEADER_LEN;
		uint64_t rest = body % cbs;
		out->st_size = (off_t)(body / cbs * fp.block_size
				       + (rest > fp.overhead ? rest - fp.overhead : 0));
	}
	out->st_dev = 0;
	rc = 0;
out:
	leave();
	return rc;
}

/* ---- libfuse's callbacks (libfuse 3 high-level signatures; fi: struct fuse_file_info *) -- */

FP_API int fp_read(const char *path, char *buf, size_t size, off_t off, void *fi)
{
	int rc = serve_read(fh_of(fi), buf, size, off);
	if (rc >= 0) {
		count(C_READS, 1);
		count(C_READ_BYTES, (unsigned long)rc);
		return rc;
	}
	count(C_FALLBACKS, 1);
	return ((fp_read_fn)fp.fallback[FP_OP_READ])(path, buf, size, off, fi);
}

FP_API int fp_write(const char *path, const char *buf, size_t size, off_t off, void *fi)
{
	int rc = serve_write(fh_of(fi), buf, size, off);
	if (rc >= 0) {
		count(C_WRITES, 1);
		count(C_WRITE_BYTES, (unsigned long)rc);
		return rc;
	}
	count(C_FALLBACKS, 1);
	return ((fp_write_fn)fp.fallback[FP_OP_WRITE])(path, buf, size, off, fi);
}

FP_API int fp_getattr(const char *path, struct stat *st, void *fi)
{
	if (fi != NULL && serve_getattr(fh_of(fi), st) == 0)
		return 0;
	return ((fp_getattr_fn)fp.fallback[FP_OP_GETATTR])(path, st, fi);
}

FP_API int fp_getxattr(const char *path, const char *name, char *value, size_t size)
{
	/* Shut (suspended, or paused for a rekey): Python answers, or waits, as it must. */
	if (strncmp(name, "user.", 5) != 0 && atomic_load(&fp.open)) {
		count(C_PROBES, 1);
		return -fp.foreign_errno;
	}
	return ((fp_getxattr_fn)fp.fallback[FP_OP_GETXATTR])(path, name, value, size);
}
