/*
 * fastpath.c - encfs's native read path: serve block-aligned FUSE READs of open regular
 * files in C, on libfuse's worker thread, without entering Python.
 *
 * Why: a cold 4 KiB READ through Python costs ~27 us of user CPU (ctypes entry, the
 * operations, CipherFile) against gocryptfs's ~7 (docs/BENCHMARKS.md, issue 16). This file
 * replaces libfuse's `read` callback (fuse_operations.read, high-level API) by `fp_read`,
 * which serves the plain happy path itself and hands everything else to the callback it
 * replaced (mfusepy's ctypes thunk into encfs.fs.binding), so errors, logging, holes and
 * EIO keep their one home in Python.
 *
 * The happy path, all of which must hold (else: the Python callback, same arguments):
 *   - the native path is open (the suspension gate, fp_gate_close) and the handle `fh`
 *     (= the backing fd) is mapped to a file entry that has a cipher context (Python maps
 *     it after serving a read of it, keys.py keys it; fp_wipe removes every context);
 *   - the read starts and ends on block boundaries and is at most FP_MAX_READ bytes;
 *   - no writer is changing the file and none queued a deferred write (the entry's
 *     `seq` is even and `queued` is 0, before and after: a seqlock, see struct fp_file);
 *   - every block read is whole and authenticates (a hole, a short last block, a torn or
 *     tampered block, a read error: Python redoes the read and answers for it).
 *
 * Layout (docs/FORMAT.md section 5, as encfs/crypto.py BlockCipher): block n of B plaintext
 * bytes is at cipher offset 18 + n*(B+28): nonce(12) || AES-256-GCM(ct) || tag(16), with
 * associated data file_id(16) || u64be(n). OpenSSL's libcrypto does the AEAD: the same
 * algorithm, no cryptography of our own.
 *
 * The cipher dir is hostile input: every length read from it is bounded here, and nothing
 * but a file already opened by encfs/backing.py (a regular file) is ever read.
 *
 * Memory ordering: writers in Python store `seq` and `queued` with plain stores while
 * holding the file's write lock (or the Sealer's lock for `queued`); this relies on x86-64's
 * ordered stores (TSO). encfs/fastpath.py refuses to load this library on other machines.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define FP_VERSION 1             /* fastpath.py checks it: a stale build is not used */
#define FP_HEADER_LEN 18         /* file header: version(2) || file_id(16) */
#define FP_NONCE_LEN 12
#define FP_TAG_LEN 16
#define FP_OVERHEAD (FP_NONCE_LEN + FP_TAG_LEN)
#define FP_FILE_ID_LEN 16
#define FP_MIN_BLOCK 4096
#define FP_MAX_BLOCK 65536
#define FP_MAX_READ (1u << 20)   /* = libfuse's max_read/max_write as encfs negotiates them */
#define FP_SLOTS 4               /* cipher contexts per file: concurrent readers of one file */

#define FP_API __attribute__((visibility("default"))) /* the entry points fastpath.py calls */

typedef int (*fp_read_fn)(const char *path, char *buf, size_t size, off_t off, void *fi);

/*
 * One open backing inode (a CipherFile in Python; hard links share it). Made and freed by
 * Python (fp_file_new / fp_file_free, the latter only once no fd maps to it any more).
 *
 * `seq` and `queued` are the seqlock shared with Python (CipherFile): a writer makes `seq`
 * odd before it changes content or size and even again after; `queued` counts deferred
 * writes waiting in the Sealer. A reader samples both before and after its pread and
 * decryption, and serves only if `seq` was even and unchanged and `queued` was 0 both
 * times. A write that returned before the second sample changed `seq`, or is still queued.
 */
struct fp_file {
	_Atomic uint64_t seq;      /* offset 0: Python addresses it (fastpath.py) */
	_Atomic uint64_t queued;   /* offset 8 */
	pthread_mutex_t mu;        /* guards `master`, slot contexts' creation and wipe */
	EVP_CIPHER_CTX *master;    /* keyed template; never decrypts itself */
	struct {
		atomic_int busy;
		EVP_CIPHER_CTX *ctx;
	} slot[FP_SLOTS];
	unsigned char file_id[FP_FILE_ID_LEN];
	struct fp_file *prev, *next; /* every live entry, for fp_wipe (guarded by fp.files_mu) */
};

/*
 * The one mount this process serves: libfuse's high-level read callback takes no user
 * argument, and an encfs daemon serves exactly one mount. fp_setup resets it.
 */
static struct {
	fp_read_fn fallback;       /* the Python callback (mfusepy's thunk) */
	size_t fh_offset;          /* offsetof(struct fuse_file_info, fh), from the binding */
	uint32_t block_size;
	_Atomic(struct fp_file *) *fds; /* fd -> entry; NULL: not served natively */
	size_t nfds;
	atomic_int open;           /* the suspension gate, as Python's fs.kcache.Gate */
	atomic_long inflight;      /* native reads inside the gate */
	atomic_ulong reads, bytes, fallbacks;
	pthread_mutex_t files_mu;
	struct fp_file *files;
} fp = {.files_mu = PTHREAD_MUTEX_INITIALIZER};

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

/* ---- setup, gate, counters (called from encfs/fastpath.py) ---------------------------- */

FP_API int fp_version(void) { return FP_VERSION; }

/* Reset the mount state; `nfds` bounds the fds that can be served (RLIMIT_NOFILE). */
FP_API int fp_setup(uint32_t block_size, size_t nfds)
{
	if (block_size < FP_MIN_BLOCK || block_size > FP_MAX_BLOCK || block_size % FP_MIN_BLOCK)
		return -EINVAL;
	if (nfds == 0 || nfds > (1u << 24))
		return -EINVAL;
	free((void *)fp.fds);
	fp.fds = calloc(nfds, sizeof(*fp.fds));
	if (fp.fds == NULL)
		return -ENOMEM;
	fp.nfds = nfds;
	fp.block_size = block_size;
	fp.fallback = NULL;
	atomic_store(&fp.reads, 0);
	atomic_store(&fp.bytes, 0);
	atomic_store(&fp.fallbacks, 0);
	atomic_store(&fp.open, 1);
	return 0;
}

/*
 * Plug in (before libfuse starts serving): the callback every other read goes to, and
 * where libfuse's struct fuse_file_info keeps `fh` (the binding knows its layout).
 */
FP_API void fp_plug(fp_read_fn fallback, size_t fh_offset)
{
	fp.fallback = fallback;
	fp.fh_offset = fh_offset;
}

FP_API void fp_gate_open(void) { atomic_store(&fp.open, 1); }

/* Shut the gate and wait until no native read is inside (1), or `timeout_ms` passed (0). */
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

FP_API void fp_counters(unsigned long out[3])
{
	out[0] = atomic_load(&fp.reads);
	out[1] = atomic_load(&fp.bytes);
	out[2] = atomic_load(&fp.fallbacks);
}

/* ---- file entries ---------------------------------------------------------------------- */

FP_API struct fp_file *fp_file_new(const unsigned char file_id[FP_FILE_ID_LEN])
{
	struct fp_file *f = calloc(1, sizeof(*f));
	if (f == NULL)
		return NULL;
	if (pthread_mutex_init(&f->mu, NULL) != 0) {
		free(f);
		return NULL;
	}
	memcpy(f->file_id, file_id, FP_FILE_ID_LEN);
	pthread_mutex_lock(&fp.files_mu);
	f->next = fp.files;
	if (fp.files)
		fp.files->prev = f;
	fp.files = f;
	pthread_mutex_unlock(&fp.files_mu);
	return f;
}

/* Caller (Python) holds the file's lock: nothing else uses these contexts now. */
static void drop_contexts(struct fp_file *f)
{
	pthread_mutex_lock(&f->mu);
	for (int i = 0; i < FP_SLOTS; i++) {
		EVP_CIPHER_CTX_free(f->slot[i].ctx); /* cleanses the key schedule */
		f->slot[i].ctx = NULL;
	}
	EVP_CIPHER_CTX_free(f->master);
	f->master = NULL;
	pthread_mutex_unlock(&f->mu);
}

/*
 * Key the entry with the 32-byte per-file key at `key` (keys.py's locked arena; not kept:
 * only OpenSSL's context holds the schedule). Returns 0, or -errno. No-op if keyed.
 */
FP_API int fp_file_set_key(struct fp_file *f, const unsigned char *key)
{
	int rc = 0;
	pthread_mutex_lock(&f->mu);
	if (f->master == NULL) {
		EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
		if (ctx == NULL || EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
			EVP_CIPHER_CTX_free(ctx);
			rc = -EIO;
		} else {
			f->master = ctx;
		}
	}
	pthread_mutex_unlock(&f->mu);
	return rc;
}

/* Serve `fd`'s reads from `f` (NULL: stop). Python maps an fd only while it is open. */
FP_API int fp_map_fd(int fd, struct fp_file *f)
{
	if (fd < 0 || (size_t)fd >= fp.nfds)
		return -EBADF;
	atomic_store_explicit(&fp.fds[fd], f, memory_order_release);
	return 0;
}

/* Forget the entry (no fd maps to it any more; called at the inode's last close). */
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
	drop_contexts(f);
	pthread_mutex_destroy(&f->mu);
	OPENSSL_cleanse(f, sizeof(*f));
	free(f);
}

/*
 * Drop every cipher context (suspension, unmount): shut the gate, wait for native reads
 * in flight, free (and so cleanse) every context, then restore the gate as it was.
 * Returns 1, or 0 if reads were still inside after `timeout_ms` (contexts kept then:
 * freeing one under a reader would crash; the caller logs it and the gate stays shut).
 */
FP_API int fp_wipe(long timeout_ms)
{
	int was_open = atomic_exchange(&fp.open, 0);
	if (!fp_gate_close(timeout_ms))
		return 0;
	pthread_mutex_lock(&fp.files_mu);
	for (struct fp_file *f = fp.files; f != NULL; f = f->next)
		drop_contexts(f);
	pthread_mutex_unlock(&fp.files_mu);
	atomic_store(&fp.open, was_open);
	return 1;
}

/* ---- the read path --------------------------------------------------------------------- */

static int grab_slot(struct fp_file *f)
{
	for (int i = 0; i < FP_SLOTS; i++) {
		int expected = 0;
		if (!atomic_compare_exchange_strong(&f->slot[i].busy, &expected, 1))
			continue;
		if (f->slot[i].ctx != NULL)
			return i;
		pthread_mutex_lock(&f->mu);
		if (f->master != NULL) {
			EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
			if (ctx != NULL && EVP_CIPHER_CTX_copy(ctx, f->master) == 1)
				f->slot[i].ctx = ctx;
			else
				EVP_CIPHER_CTX_free(ctx);
		}
		pthread_mutex_unlock(&f->mu);
		if (f->slot[i].ctx != NULL)
			return i;
		atomic_store(&f->slot[i].busy, 0);
		return -1;
	}
	return -1;
}

/* Open one whole block: 1 if it authenticates (plaintext in `out`), else 0. */
static int open_block(EVP_CIPHER_CTX *ctx, const unsigned char *file_id, uint64_t block_no,
		      const unsigned char *in, unsigned char *out, int plain_len)
{
	unsigned char ad[FP_FILE_ID_LEN + 8];
	unsigned char tag[FP_TAG_LEN];
	int len;
	memcpy(ad, file_id, FP_FILE_ID_LEN);
	for (int i = 0; i < 8; i++)
		ad[FP_FILE_ID_LEN + i] = (unsigned char)(block_no >> (56 - 8 * i));
	memcpy(tag, in + FP_NONCE_LEN + plain_len, FP_TAG_LEN);
	return EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, in) == 1
	       && EVP_DecryptUpdate(ctx, NULL, &len, ad, sizeof(ad)) == 1
	       && EVP_DecryptUpdate(ctx, out, &len, in + FP_NONCE_LEN, plain_len) == 1
	       && len == plain_len
	       && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, FP_TAG_LEN, tag) == 1
	       && EVP_DecryptFinal_ex(ctx, out + len, &len) == 1;
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

/* The read, or -1: not the happy path (the caller hands it to Python). */
static int serve(uint64_t fh, char *buf, size_t size, off_t off)
{
	const size_t bs = fp.block_size, cbs = bs + FP_OVERHEAD;
	struct fp_file *f;
	uint64_t seq, first;
	size_t nblocks, whole, rem;
	ssize_t got;
	unsigned char *cipher;
	int slot, rc = -1;

	if (fh >= fp.nfds || off < 0 || size == 0 || size > FP_MAX_READ
	    || (uint64_t)off % bs || size % bs)
		return -1;
	first = (uint64_t)off / bs;
	nblocks = size / bs;
	if (first > ((uint64_t)INT64_MAX - FP_HEADER_LEN) / cbs - nblocks)
		return -1; /* the cipher offset would not fit an off_t */

	atomic_fetch_add(&fp.inflight, 1);
	if (!atomic_load(&fp.open))
		goto out;
	f = atomic_load_explicit(&fp.fds[fh], memory_order_acquire);
	if (f == NULL)
		goto out;
	seq = atomic_load_explicit(&f->seq, memory_order_acquire);
	if (seq & 1 || atomic_load_explicit(&f->queued, memory_order_acquire))
		goto out;
	cipher = thread_buffer(nblocks * cbs);
	if (cipher == NULL)
		goto out;
	slot = grab_slot(f);
	if (slot < 0)
		goto out;
	got = pread_full((int)fh, cipher, nblocks * cbs, (off_t)(FP_HEADER_LEN + first * cbs));
	if (got >= 0) {
		whole = (size_t)got / cbs;
		rem = (size_t)got % cbs;
		/* A partial last block (rem > 28) goes to Python (short blocks need its stack
		 * scrub); 1..28 trailing bytes hold no plaintext and are ignored, as plain_size. */
		if (rem <= FP_OVERHEAD) {
			rc = (int)(whole * bs);
			for (size_t i = 0; i < whole && rc >= 0; i++)
				if (!open_block(f->slot[slot].ctx, f->file_id, first + i,
						cipher + i * cbs, (unsigned char *)buf + i * bs, (int)bs))
					rc = -1;
		}
	}
	atomic_store(&f->slot[slot].busy, 0);
	atomic_thread_fence(memory_order_acquire);
	if (atomic_load_explicit(&f->queued, memory_order_acquire)
	    || atomic_load_explicit(&f->seq, memory_order_acquire) != seq)
		rc = -1;
out:
	atomic_fetch_sub(&fp.inflight, 1);
	return rc;
}

/* libfuse's `read` (fuse_operations.read, libfuse 3); `fi` is a struct fuse_file_info *. */
FP_API int fp_read(const char *path, char *buf, size_t size, off_t off, void *fi)
{
	uint64_t fh;
	int rc;
	memcpy(&fh, (const char *)fi + fp.fh_offset, sizeof(fh));
	rc = serve(fh, buf, size, off);
	if (rc >= 0) {
		atomic_fetch_add(&fp.reads, 1);
		atomic_fetch_add(&fp.bytes, (unsigned long)rc);
		return rc;
	}
	atomic_fetch_add(&fp.fallbacks, 1);
	return fp.fallback(path, buf, size, off, fi);
}
