/* The node's C-STORE receive loop in C: the per-instance work of radnet_node.ingest for ordinary
 * C-STOREs on a plain (non-TLS) socket, so that no Python runs per instance.
 *
 * radnet_node.ingest stays the reference and the fallback: everything this loop does not settle
 * itself it hands back, at a clean point, to the Python code, which then goes on exactly as if it
 * had read those bytes itself (any command but an ordinary C-STORE-RQ, any PDU but P-DATA-TF, a
 * dataset whose header cannot be found in its first bytes or whose checks fail, a duplicate, a
 * series folder it cannot make, a write error, a budget of disk space used up). What it settles:
 *
 *   - PDU framing and the PDVs of P-DATA-TF (the same checks and messages as dicom_ul);
 *   - a C-STORE-RQ on its own context (SOP class = the context's, UIDs valid);
 *   - the dataset streamed to a temporary spool file behind its file meta information;
 *   - the header elements found in its first bytes (the walk of dicom_ul.scan_header);
 *   - the checks of ingest._Incoming._finish (dataset UIDs valid, SOP Instance UID and SOP class
 *     the request's), the move to spool/<study>/<series>/<sop>.dcm (making the folders of a new
 *     series), and the C-STORE-RSP.
 *
 * The loop runs without the GIL and returns to Python after at most max_instances instances, or
 * at a PDU boundary max_seconds after the first instance it has not yet reported, or when the
 * peer pauses that long: the instances it stored are then registered by the Python side (the
 * catalog follows the spool as before; a kill in between loses nothing, recovery registers
 * spool files without a row).
 *
 * Every length read from the network is checked against what was received before it is used.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* renameat2 */
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif
#ifndef O_CLOEXEC
#define O_CLOEXEC 0
#endif

/* ------------------------------------------------------------------------------------------ */
/* the header elements ingest needs (dicom_ul._WANTED)                                           */

#define N_WANTED 9
static const uint32_t WANTED_TAGS[N_WANTED] = {
    0x00080005, 0x00080016, 0x00080018, 0x00080050, 0x00080060,
    0x0008103E, 0x0020000D, 0x0020000E, 0x00200011,
};
static const char *const WANTED_NAMES[N_WANTED] = {
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "AccessionNumber", "Modality",
    "SeriesDescription", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
};
enum { W_CLASS = 1, W_INSTANCE = 2, W_STUDY = 6, W_SERIES = 7 };
#define LAST_WANTED 0x00200011u
#define UNDEFINED 0xFFFFFFFFu
#define ITEM 0xFFFEE000u
#define ITEM_END 0xFFFEE00Du
#define SEQUENCE_END 0xFFFEE0DDu
/* ingest._HEAD_LIMIT: beyond it the Python side reads the header from the spooled file */
#define HEAD_LIMIT (1u << 20)
/* a wanted value longer than this is left to the Python side */
#define MAX_VALUE 1024u
/* a command set longer than this is a protocol error (dicom_ul.MAX_COMMAND) */
#define MAX_COMMAND (1u << 20)
#define MAX_UID 64u
#define PATH_CAP 4096

enum { SCAN_OK, SCAN_MORE, SCAN_BAD };

typedef struct {
    int present[N_WANTED];
    uint64_t offset[N_WANTED];
    uint32_t length[N_WANTED];
} Found;

static inline uint32_t le16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
static inline uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}
static inline void put_le16(uint8_t *p, uint32_t v) { p[0] = v & 0xFF; p[1] = (v >> 8) & 0xFF; }
static inline void put_le32(uint8_t *p, uint32_t v) {
    p[0] = v & 0xFF; p[1] = (v >> 8) & 0xFF; p[2] = (v >> 16) & 0xFF; p[3] = (v >> 24) & 0xFF;
}
static inline void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (v >> 24) & 0xFF; p[1] = (v >> 16) & 0xFF; p[2] = (v >> 8) & 0xFF; p[3] = v & 0xFF;
}

static int is_long_vr(const uint8_t *vr) {
    static const char LONG_VRS[][2] = {
        {'O', 'B'}, {'O', 'D'}, {'O', 'F'}, {'O', 'L'}, {'O', 'V'}, {'O', 'W'}, {'S', 'Q'},
        {'S', 'V'}, {'U', 'C'}, {'U', 'N'}, {'U', 'R'}, {'U', 'T'}, {'U', 'V'},
    };
    for (size_t i = 0; i < sizeof LONG_VRS / sizeof LONG_VRS[0]; i++)
        if (vr[0] == (uint8_t)LONG_VRS[i][0] && vr[1] == (uint8_t)LONG_VRS[i][1]) return 1;
    return 0;
}

static inline int is_sequence_vr(const uint8_t *vr) {
    return (vr[0] == 'S' && vr[1] == 'Q') || (vr[0] == 'U' && vr[1] == 'N');
}

static inline int is_upper(uint8_t c) { return c >= 'A' && c <= 'Z'; }

static inline uint32_t tag_at(const uint8_t *d, uint64_t pos) {
    return (le16(d + pos) << 16) | le16(d + pos + 2);
}

/* dicom_ul._element_at: the element at pos (tag, value offset, length, a sequence to walk) */
static int element_at(const uint8_t *d, uint64_t n, uint64_t pos, int implicit, uint32_t *tag,
                      uint64_t *offset, uint32_t *length, int *nested) {
    if (pos + 4 > n) return SCAN_MORE;
    *tag = tag_at(d, pos);
    if (implicit || (*tag >> 16) == 0xFFFE) {
        if (pos + 8 > n) return SCAN_MORE;
        *length = le32(d + pos + 4);
        *offset = pos + 8;
        *nested = *length == UNDEFINED;
        return SCAN_OK;
    }
    if (pos + 8 > n) return SCAN_MORE;
    const uint8_t *vr = d + pos + 4;
    if (is_long_vr(vr)) {
        if (pos + 12 > n) return SCAN_MORE;
        *length = le32(d + pos + 8);
        *offset = pos + 12;
        *nested = is_sequence_vr(vr) && *length == UNDEFINED;
        return SCAN_OK;
    }
    if (!(is_upper(vr[0]) && is_upper(vr[1]))) return SCAN_BAD;
    *length = le16(d + pos + 6);
    *offset = pos + 8;
    *nested = 0;
    return SCAN_OK;
}

/* dicom_ul._skip_sequence: past the delimiter of an undefined-length sequence */
static int skip_sequence(const uint8_t *d, uint64_t n, uint64_t pos, int implicit, int depth,
                         uint64_t *after) {
    if (depth > 16) return SCAN_BAD;
    for (;;) {
        if (pos + 8 > n) return SCAN_MORE;
        uint32_t tag = tag_at(d, pos);
        uint32_t length = le32(d + pos + 4);
        pos += 8;
        if (tag == SEQUENCE_END) {
            *after = pos;
            return SCAN_OK;
        }
        if (tag != ITEM) return SCAN_BAD;
        if (length != UNDEFINED) {
            pos += length;
            continue;
        }
        for (;;) {
            uint32_t t, l;
            uint64_t off;
            int nested;
            int r = element_at(d, n, pos, implicit, &t, &off, &l, &nested);
            if (r != SCAN_OK) return r;
            if (t == ITEM_END) {
                pos = off;
                break;
            }
            if (nested) {
                r = skip_sequence(d, n, off, implicit, depth + 1, &pos);
                if (r != SCAN_OK) return r;
            } else {
                pos = off + l;
            }
        }
    }
}

/* dicom_ul._scan with complete=False: the wanted elements' places in d */
static int scan(const uint8_t *d, uint64_t n, int implicit, Found *f, uint64_t *stop) {
    memset(f, 0, sizeof *f);
    uint64_t pos = 0;
    while (pos + 8 <= n) {
        uint32_t group = le16(d + pos), element = le16(d + pos + 2);
        uint32_t length;
        uint64_t offset = pos + 8;
        int sequence = 0;
        if (implicit || group == 0xFFFE) {
            length = le32(d + pos + 4);
            sequence = length == UNDEFINED;
        } else {
            const uint8_t *vr = d + pos + 4;
            length = le16(d + pos + 6);
            if (is_long_vr(vr)) {
                if (pos + 12 > n) return SCAN_MORE;
                length = le32(d + pos + 8);
                offset = pos + 12;
                sequence = is_sequence_vr(vr) && length == UNDEFINED;
            } else if (!(is_upper(vr[0]) && is_upper(vr[1]))) {
                return SCAN_BAD;
            }
        }
        uint32_t tag = (group << 16) | element;
        if (tag > LAST_WANTED) {
            *stop = pos;
            return SCAN_OK;
        }
        if (sequence) {
            int r = skip_sequence(d, n, offset, implicit, 0, &pos);
            if (r != SCAN_OK) return r;
            continue;
        }
        if (length == UNDEFINED) return SCAN_BAD;
        for (int w = 0; w < N_WANTED; w++) {
            if (WANTED_TAGS[w] == tag) {
                if (offset + length > n) return SCAN_MORE;
                f->present[w] = 1;
                f->offset[w] = offset;
                f->length[w] = length;
                break;
            }
        }
        pos = offset + length;
    }
    return SCAN_MORE;
}

/* ------------------------------------------------------------------------------------------ */
/* UIDs                                                                                          */

/* the length of a value without its trailing NULs and spaces (bytes.rstrip(b"\0 ")) */
static size_t stripped(const uint8_t *v, size_t n) {
    while (n > 0 && (v[n - 1] == 0 || v[n - 1] == ' ')) n--;
    return n;
}

/* catalog.is_safe_uid: digits in dot-separated components, at most 64 characters */
static int is_safe_uid(const uint8_t *v, size_t n) {
    if (n == 0 || n > MAX_UID) return 0;
    int digit_before = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i] >= '0' && v[i] <= '9') {
            digit_before = 1;
        } else if (v[i] == '.' && digit_before) {
            digit_before = 0;
        } else {
            return 0;
        }
    }
    return digit_before;
}

/* ------------------------------------------------------------------------------------------ */
/* the loop's state                                                                              */

typedef struct {
    int id;            /* presentation context ID */
    int fast;          /* C-STOREs on it are settled here (not Verification) */
    int implicit;      /* how its datasets are scanned: 1 implicit VR, 0 explicit, -1 not here */
    uint8_t abstract[MAX_UID];
    size_t abstract_len;
    uint8_t meta_head[512]; /* file meta elements (0002,0001) and (0002,0002) */
    size_t meta_head_len;
    uint8_t meta_tail[512]; /* (0002,0010) to the end */
    size_t meta_tail_len;
} Context;

typedef struct {
    uint8_t *values; /* the wanted values, one after the other */
    uint32_t length[N_WANTED];
    int present[N_WANTED];
    uint64_t size;
    double received_at;
    int context_id;
} Stored;

enum {
    KIND_BATCH = 0,   /* instances stored; nothing else to hand over */
    KIND_PDU = 1,     /* a PDU other than P-DATA-TF, read whole */
    KIND_COMMAND = 2, /* a command set this loop does not settle */
    KIND_DATASET = 3, /* a dataset handed over (complete or not) */
    KIND_ERROR = 4,   /* the association ends */
};
enum { ERR_CLOSED = 1, ERR_CLOSED_MID_PDU = 2, ERR_TIMEOUT = 3, ERR_OS = 4, ERR_PROTOCOL = 5 };

typedef struct {
    /* arguments */
    int sock;
    uint64_t limit;
    Context *contexts;
    int n_contexts;
    const char *spool_dir;
    const char *temp_prefix;
    long long counter;
    uint64_t budget;
    int max_instances;
    double max_seconds;
    double pause_seconds;
    /* the PDU buffer: the caller's (kept between calls), or one of this call for a larger PDU */
    uint8_t *buffer;
    uint64_t buffer_size;
    uint8_t *own_buffer;
    /* the command set being received (kept for the dataset that follows) */
    uint8_t *command;
    size_t command_len, command_cap;
    int command_context;
    /* the C-STORE whose dataset is being received */
    int incoming;
    Context *in_context;
    char temp[PATH_CAP];
    int fd;
    uint64_t size;
    int meta_pending;
    int settled; /* the header was found and fits: this loop may finish it */
    int scanned;  /* the scan has ended (found, or given up) */
    int scan_bad; /* the first bytes are no dataset: the Python side refuses it */
    uint8_t *head;
    size_t head_len, head_cap;
    size_t scan_next; /* the kept head is scanned again once it is this long */
    Found found;
    uint8_t uid[MAX_UID];
    size_t uid_len;
    uint32_t message_id;
    double received_at;
    Stored pending; /* the values found (pending.values owned until stored) */
    /* the spare temporary file opened for the next C-STORE */
    char spare[PATH_CAP];
    int spare_fd;
    /* results */
    Stored *stored;
    int n_stored;
    uint64_t spent;
    double first_unreported;
    int kind;
    int error;
    int error_errno;
    char message[256];
    const uint8_t *rest; /* P-DATA PDVs not yet processed (KIND_COMMAND, KIND_DATASET) */
    size_t rest_len;
    int pdu_type;
    uint8_t *pdu_body; /* KIND_PDU */
    size_t pdu_len;
    int handover_complete;
    int handover_errno;
    char unfinished[MAX_UID + 1]; /* the SOP Instance UID of a dataset cut off */
} Loop;

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double realtime(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(Loop *L, int error, int err, const char *fmt, ...) {
    L->kind = KIND_ERROR;
    L->error = error;
    L->error_errno = err;
    va_list args;
    va_start(args, fmt);
    vsnprintf(L->message, sizeof L->message, fmt, args);
    va_end(args);
}

/* after a failed recv or send (r < 0): 0 to try again (EINTR), or -1 with the loop's error set
 * (the kernel's timeout, SO_RCVTIMEO / SO_SNDTIMEO, ran out: ERR_TIMEOUT) */
static int io_failed(Loop *L, const char *timeout_message) {
    if (errno == EINTR) return 0;
    if (errno == EAGAIN || errno == EWOULDBLOCK)
        fail(L, ERR_TIMEOUT, 0, "%s", timeout_message);
    else
        fail(L, ERR_OS, errno, "%s", strerror(errno));
    return -1;
}

/* recv exactly n bytes. 0: done; -1: the loop's error is set. */
static int recv_exact(Loop *L, uint8_t *p, size_t n, int mid_pdu) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(L->sock, p + got, n - got, 0);
        if (r > 0) {
            got += (size_t)r;
        } else if (r == 0) {
            fail(L, (mid_pdu || got > 0) ? ERR_CLOSED_MID_PDU : ERR_CLOSED, 0, "closed");
            return -1;
        } else if (io_failed(L, "nothing received within the network timeout")) {
            return -1;
        }
    }
    return 0;
}

static int send_all(Loop *L, const uint8_t *p, size_t n) {
    size_t sent = 0;
    while (sent < n) {
        ssize_t r = send(L->sock, p + sent, n - sent, MSG_NOSIGNAL);
        if (r >= 0)
            sent += (size_t)r;
        else if (io_failed(L, "nothing sent within the network timeout"))
            return -1;
    }
    return 0;
}

/* write all of the iovecs; 0, or an errno */
static int write_all(int fd, struct iovec *iov, int count) {
    while (count > 0) {
        ssize_t r = writev(fd, iov, count);
        if (r < 0) {
            if (errno == EINTR) continue;
            return errno ? errno : EIO;
        }
        size_t left = (size_t)r;
        while (count > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

static Context *context_of(Loop *L, int id) {
    for (int i = 0; i < L->n_contexts; i++)
        if (L->contexts[i].id == id) return &L->contexts[i];
    return NULL;
}

static int open_temporary(Loop *L, char *path) {
    int n = snprintf(path, PATH_CAP, "%s%lld.tmp", L->temp_prefix, L->counter++);
    if (n < 0 || n >= PATH_CAP) return -1;
    return open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
}

static void drop_incoming_file(Loop *L) {
    if (L->fd >= 0) close(L->fd);
    L->fd = -1;
    unlink(L->temp);
}

static void reset_incoming(Loop *L) {
    L->incoming = 0;
    L->command_len = 0;
    L->head_len = 0;
    L->settled = 0;
    L->scanned = 0;
    L->scan_bad = 0;
    free(L->pending.values);
    L->pending.values = NULL;
}

/* a complete command set: start receiving its dataset here (1), or hand it over (0) */
static int start_store(Loop *L, Context *ctx) {
    /* the elements used, by index: Affected SOP Class UID, Command Field, Message ID, Command
     * Data Set Type, Affected SOP Instance UID (a repeated element: the last, as in Python) */
    static const uint32_t USED[5] = {0x0002, 0x0100, 0x0110, 0x0800, 0x1000};
    const uint8_t *c = L->command;
    size_t n = L->command_len, pos = 0;
    const uint8_t *value[5] = {0};
    uint32_t vlen[5] = {0};
    if (!ctx->fast) return 0;
    while (pos < n) {
        if (n - pos < 8) return 0;
        uint32_t group = le16(c + pos), element = le16(c + pos + 2), length = le32(c + pos + 4);
        pos += 8;
        if (group != 0 || length > n - pos) return 0; /* the Python side reports it */
        for (int i = 0; i < 5; i++) {
            if (USED[i] == element) {
                value[i] = c + pos;
                vlen[i] = length;
            }
        }
        pos += length;
    }
    if (vlen[1] < 2 || vlen[2] < 2 || vlen[3] < 2) return 0;
    if (le16(value[1]) != 0x0001 || le16(value[3]) == 0x0101) return 0;
    size_t class_len = value[0] ? stripped(value[0], vlen[0]) : 0;
    size_t uid_len = value[4] ? stripped(value[4], vlen[4]) : 0;
    if (!is_safe_uid(value[0], class_len) || !is_safe_uid(value[4], uid_len)) return 0;
    if (class_len != ctx->abstract_len || memcmp(value[0], ctx->abstract, class_len)) return 0;
    if (ctx->implicit < 0) return 0; /* read back with pydicom */
    int fd = L->spare_fd;
    if (fd >= 0) {
        memcpy(L->temp, L->spare, PATH_CAP);
        L->spare_fd = -1;
    } else {
        fd = open_temporary(L, L->temp);
        if (fd < 0) return 0; /* the Python side opens its own, and reports */
    }
    L->incoming = 1;
    L->in_context = ctx;
    L->fd = fd;
    L->size = 0;
    L->meta_pending = 1;
    L->settled = 0;
    L->scanned = 0;
    L->scan_bad = 0;
    L->head_len = 0;
    memcpy(L->uid, value[4], uid_len);
    L->uid_len = uid_len;
    L->message_id = le16(value[2]);
    L->received_at = realtime();
    return 1;
}

/* the file meta information for the incoming dataset (dicom_ul.file_meta_header) */
static size_t file_meta(Loop *L, uint8_t *out) {
    Context *ctx = L->in_context;
    size_t uid_padded = L->uid_len + (L->uid_len & 1);
    size_t body = ctx->meta_head_len + 8 + uid_padded + ctx->meta_tail_len;
    uint8_t *p = out;
    memset(p, 0, 128);
    memcpy(p + 128, "DICM", 4);
    p += 132;
    /* (0002,0000) UL 4 */
    put_le16(p, 0x0002); put_le16(p + 2, 0x0000); p[4] = 'U'; p[5] = 'L'; put_le16(p + 6, 4);
    put_le32(p + 8, (uint32_t)body);
    p += 12;
    memcpy(p, ctx->meta_head, ctx->meta_head_len);
    p += ctx->meta_head_len;
    put_le16(p, 0x0002); put_le16(p + 2, 0x0003); p[4] = 'U'; p[5] = 'I';
    put_le16(p + 6, (uint32_t)uid_padded);
    memcpy(p + 8, L->uid, L->uid_len);
    if (L->uid_len & 1) p[8 + L->uid_len] = 0;
    p += 8 + uid_padded;
    memcpy(p, ctx->meta_tail, ctx->meta_tail_len);
    p += ctx->meta_tail_len;
    return (size_t)(p - out);
}

/* keep the values found (they point into a buffer about to be reused) */
static int keep_found(Loop *L, const uint8_t *d) {
    size_t total = 0;
    for (int w = 0; w < N_WANTED; w++) {
        if (!L->found.present[w]) continue;
        if (L->found.length[w] > MAX_VALUE) return 0;
        total += L->found.length[w];
    }
    uint8_t *values = malloc(total ? total : 1);
    if (!values) return 0;
    size_t at = 0;
    for (int w = 0; w < N_WANTED; w++) {
        L->pending.present[w] = L->found.present[w];
        L->pending.length[w] = L->found.present[w] ? L->found.length[w] : 0;
        if (L->found.present[w]) {
            memcpy(values + at, d + L->found.offset[w], L->found.length[w]);
            at += L->found.length[w];
        }
    }
    free(L->pending.values);
    L->pending.values = values;
    return 1;
}

/* append n bytes to a growing buffer; -1 (the loop's error set) when memory runs out */
static int append(Loop *L, uint8_t **buf, size_t *len, size_t *cap, const uint8_t *p, size_t n) {
    if (n == 0) return 0;
    if (*len + n > *cap) {
        size_t grown_cap = (*len + n) * 2;
        uint8_t *grown = realloc(*buf, grown_cap);
        if (!grown) {
            fail(L, ERR_OS, ENOMEM, "%s", strerror(ENOMEM));
            return -1;
        }
        *buf = grown;
        *cap = grown_cap;
    }
    memcpy(*buf + *len, p, n);
    *len += n;
    return 0;
}

/* append n bytes to the dataset's first bytes kept for the scan */
static int keep_head(Loop *L, const uint8_t *p, size_t n) {
    return append(L, &L->head, &L->head_len, &L->head_cap, p, n);
}

/* scan a dataset fragment as it arrives (ingest._Incoming._scan_head), keeping what the Python
 * side scans if the dataset is handed over; 0, or -1 with the loop's error set */
static int scan_fragment(Loop *L, const uint8_t *fragment, size_t n, int last) {
    int kept = L->head_len > 0; /* the scan needs the bytes before this fragment too */
    if (kept && keep_head(L, fragment, n) < 0) return -1;
    const uint8_t *d = kept ? L->head : fragment;
    size_t len = kept ? L->head_len : n;
    /* scanned again only once it has doubled: a peer sending tiny PDVs before a long header
     * would otherwise cost a scan of the whole head per PDV (quadratic) */
    if (kept && !last && len < L->scan_next && len <= HEAD_LIMIT) return 0;
    L->scan_next = 2 * len;
    uint64_t stop = 0;
    int r = scan(d, len, L->in_context->implicit, &L->found, &stop);
    if (r == SCAN_OK) {
        L->scanned = 1;
        L->settled = keep_found(L, d); /* (0 when memory runs out: then handed over) */
        /* up to the element header that ended the scan (12 bytes at most) */
        return kept ? 0 : keep_head(L, fragment, stop + 12 < n ? (size_t)stop + 12 : n);
    }
    if (r == SCAN_BAD) {
        L->scanned = 1;
        L->scan_bad = 1;
    } else if (len > HEAD_LIMIT) {
        L->scanned = 1; /* the Python side reads the header from the spooled file */
    }
    return kept ? 0 : keep_head(L, fragment, n);
}

/* hand the incoming dataset over to the Python side */
static void hand_over(Loop *L, int complete, int err, const uint8_t *rest, size_t rest_len) {
    L->kind = KIND_DATASET;
    L->handover_complete = complete;
    L->handover_errno = err;
    L->rest = rest;
    L->rest_len = rest_len;
}

/* move a temporary file to its place unless a file is there (another association may have
 * stored the same instance since the check); 0, or -1 with errno */
static int place(const char *temporary, const char *final) {
#if defined(__linux__) && defined(RENAME_NOREPLACE)
    if (renameat2(AT_FDCWD, temporary, AT_FDCWD, final, RENAME_NOREPLACE) == 0) return 0;
    if (errno != EINVAL && errno != ENOSYS) return -1; /* EEXIST: a duplicate */
#endif
    /* (no RENAME_NOREPLACE here: checked just before, as the Python side does) */
    struct stat st;
    if (lstat(final, &st) == 0) {
        errno = EEXIST;
        return -1;
    }
    if (errno != ENOENT) return -1;
    return rename(temporary, final);
}

/* make the study and series folders of a final path (<spool>/<study>/<series>/<sop>.dcm), as
 * ingest._place does; 0, or -1 with errno (the spool folder itself is not made here) */
static int make_folders(char *final) {
    char *series_end = strrchr(final, '/');
    if (!series_end) return -1;
    *series_end = 0;
    char *study_end = strrchr(final, '/');
    int r = -1;
    if (study_end) {
        *study_end = 0;
        r = mkdir(final, 0777);
        *study_end = '/';
        if (r == 0 || errno == EEXIST) r = mkdir(final, 0777);
        if (r != 0 && errno == EEXIST) r = 0;
    }
    *series_end = '/';
    return r;
}

/* the whole dataset is in: check, place and answer it here (1), or hand it over (0) */
static int finish_store(Loop *L) {
    if (!L->settled) return 0;
    Stored *s = &L->pending;
    const uint8_t *v = s->values;
    const uint8_t *at[N_WANTED];
    size_t len[N_WANTED];
    size_t offset = 0;
    for (int w = 0; w < N_WANTED; w++) {
        at[w] = v + offset;
        len[w] = s->present[w] ? stripped(v + offset, s->length[w]) : 0;
        offset += s->length[w];
    }
    if (!is_safe_uid(at[W_INSTANCE], len[W_INSTANCE]) || !is_safe_uid(at[W_STUDY], len[W_STUDY]) ||
        !is_safe_uid(at[W_SERIES], len[W_SERIES]))
        return 0;
    if (len[W_INSTANCE] != L->uid_len || memcmp(at[W_INSTANCE], L->uid, L->uid_len)) return 0;
    if (len[W_CLASS] && (len[W_CLASS] != L->in_context->abstract_len ||
                         memcmp(at[W_CLASS], L->in_context->abstract, len[W_CLASS])))
        return 0;
    if (L->size > L->budget - L->spent) return 0;
    char final[PATH_CAP];
    int n = snprintf(final, PATH_CAP, "%s/%.*s/%.*s/%.*s.dcm", L->spool_dir, (int)len[W_STUDY],
                     at[W_STUDY], (int)len[W_SERIES], at[W_SERIES], (int)L->uid_len, L->uid);
    if (n < 0 || n >= PATH_CAP) return 0;
    if (close(L->fd) != 0) {
        L->fd = -1;
        return -(errno ? errno : EIO); /* handed over closed: the Python side refuses it */
    }
    L->fd = -1;
    if (place(L->temp, final) != 0) {
        /* the first instance of a series: its folders, then again; anything else (a duplicate,
         * a folder that cannot be made): the Python side */
        if (errno != ENOENT || make_folders(final) != 0 || place(L->temp, final) != 0) return 0;
    }
    s->size = L->size;
    s->received_at = L->received_at;
    s->context_id = L->in_context->id;
    return 1;
}

/* the C-STORE-RSP, success, in a P-DATA-TF (dicom_ul.command_response and pdata_pdu) */
static size_t store_response(Loop *L, uint8_t *out) {
    Context *ctx = L->in_context;
    size_t class_padded = ctx->abstract_len + (ctx->abstract_len & 1);
    size_t uid_padded = L->uid_len + (L->uid_len & 1);
    size_t body = (8 + class_padded) + 4 * (8 + 2) + (8 + uid_padded);
    size_t command = 12 + body;
    uint8_t *p = out;
    p[0] = 0x04; p[1] = 0;
    put_be32(p + 2, (uint32_t)(command + 6));
    put_be32(p + 6, (uint32_t)(command + 2));
    p[10] = (uint8_t)ctx->id;
    p[11] = 0x03;
    p += 12;
#define ELEMENT(el, n) (put_le16(p, 0), put_le16(p + 2, (el)), put_le32(p + 4, (n)), p += 8)
    ELEMENT(0x0000, 4); put_le32(p, (uint32_t)body); p += 4;
    ELEMENT(0x0002, (uint32_t)class_padded);
    memcpy(p, ctx->abstract, ctx->abstract_len);
    if (ctx->abstract_len & 1) p[ctx->abstract_len] = 0;
    p += class_padded;
    ELEMENT(0x0100, 2); put_le16(p, 0x8001); p += 2;
    ELEMENT(0x0120, 2); put_le16(p, L->message_id); p += 2;
    ELEMENT(0x0800, 2); put_le16(p, 0x0101); p += 2;
    ELEMENT(0x0900, 2); put_le16(p, 0x0000); p += 2;
    ELEMENT(0x1000, (uint32_t)uid_padded);
    memcpy(p, L->uid, L->uid_len);
    if (L->uid_len & 1) p[L->uid_len] = 0;
    p += uid_padded;
#undef ELEMENT
    return (size_t)(p - out);
}

/* the next PDU's header. 0: read; 1: return first (instances are unreported and the batch is
 * full, or the batch wait is over, or the peer pauses); -1: the loop's error is set. While
 * instances are unreported the header is read without blocking, and a wait is bounded. */
static int next_header(Loop *L, uint8_t *header) {
    size_t got = 0;
    if (L->n_stored > 0) {
        if (L->n_stored >= L->max_instances) return 1;
        for (;;) {
            double left = L->first_unreported + L->max_seconds - monotonic();
            if (left <= 0) return 1;
            ssize_t r = recv(L->sock, header, 6, MSG_DONTWAIT);
            if (r > 0) {
                got = (size_t)r;
                break;
            }
            if (r == 0) {
                fail(L, ERR_CLOSED, 0, "closed");
                return -1;
            }
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                fail(L, ERR_OS, errno, "%s", strerror(errno));
                return -1;
            }
            if (left > L->pause_seconds) left = L->pause_seconds;
            struct pollfd p = {.fd = L->sock, .events = POLLIN};
            int n = poll(&p, 1, (int)(left * 1000) + 1);
            if (n == 0) return 1;
            if (n < 0 && errno != EINTR) {
                fail(L, ERR_OS, errno, "%s", strerror(errno));
                return -1;
            }
        }
    }
    return recv_exact(L, header + got, 6 - got, got > 0) != 0 ? -1 : 0;
}

/* the PDVs of a P-DATA-TF body; 0 to go on with the next PDU, -1 when the loop returns */
static int pdata(Loop *L, const uint8_t *body, size_t end) {
    size_t pos = 0;
    while (pos < end) {
        if (end - pos < 6) {
            fail(L, ERR_PROTOCOL, 0, "truncated PDV item in a P-DATA-TF");
            return -1;
        }
        uint32_t length = be32(body + pos);
        int context_id = body[pos + 4], control = body[pos + 5];
        if (length < 2 || (uint64_t)pos + 4 + length > end) {
            fail(L, ERR_PROTOCOL, 0, "PDV item length %u does not fit its P-DATA-TF", length);
            return -1;
        }
        const uint8_t *fragment = body + pos + 6;
        size_t n = length - 2;
        pos += 4 + (size_t)length;
        Context *ctx = context_of(L, context_id);
        if (!ctx) {
            fail(L, ERR_PROTOCOL, 0, "P-DATA on presentation context %d, not accepted", context_id);
            return -1;
        }
        if (control & 0x01) { /* a command fragment */
            if (L->incoming) {
                fail(L, ERR_PROTOCOL, 0, "a command inside a dataset");
                return -1;
            }
            if (L->command_len + n > MAX_COMMAND) {
                fail(L, ERR_PROTOCOL, 0, "a command set of more than %u bytes", MAX_COMMAND);
                return -1;
            }
            if (append(L, &L->command, &L->command_len, &L->command_cap, fragment, n) < 0)
                return -1;
            if (control & 0x02) {
                L->command_context = context_id;
                if (!start_store(L, ctx)) {
                    L->kind = KIND_COMMAND;
                    L->rest = body + pos;
                    L->rest_len = end - pos;
                    return -1;
                }
            }
            continue;
        }
        if (!L->incoming || L->in_context->id != context_id) {
            fail(L, ERR_PROTOCOL, 0, "a dataset without its command");
            return -1;
        }
        if (!L->scanned) {
            if (scan_fragment(L, fragment, n, control & 0x02) < 0) return -1;
            if (L->scan_bad) { /* refused by the Python side, which stops writing it here */
                hand_over(L, control & 0x02, 0, body + pos, end - pos);
                return -1;
            }
        }
        uint8_t meta[132 + 12 + 2 * 256 + 8 + MAX_UID + 1];
        struct iovec iov[2];
        int count = 0;
        size_t meta_len = 0;
        if (L->meta_pending) {
            meta_len = file_meta(L, meta);
            iov[count].iov_base = meta;
            iov[count++].iov_len = meta_len;
        }
        iov[count].iov_base = (void *)fragment;
        iov[count++].iov_len = n;
        int err = write_all(L->fd, iov, count);
        if (err) { /* the Python side drops the file and refuses the instance after its end */
            hand_over(L, 0, err, body + pos, end - pos);
            return -1;
        }
        L->meta_pending = 0;
        L->size += meta_len + n;
        if (!(control & 0x02)) continue;
        /* (the results have room for max_instances: one PDU may hold many small C-STOREs) */
        int finished = L->n_stored < L->max_instances ? finish_store(L) : 0;
        if (finished != 1) {
            hand_over(L, 1, -finished, body + pos, end - pos);
            return -1;
        }
        /* at its place: the peer's answer, then the next instance's temporary file */
        Stored *s = &L->stored[L->n_stored++];
        *s = L->pending;
        L->pending.values = NULL;
        if (L->n_stored == 1) L->first_unreported = monotonic();
        L->spent += s->size;
        reset_incoming(L);
        uint8_t response[12 + 12 + 8 + MAX_UID + 1 + 4 * 10 + 8 + MAX_UID + 1];
        if (send_all(L, response, store_response(L, response)) != 0) return -1;
        if (L->spare_fd < 0) L->spare_fd = open_temporary(L, L->spare);
    }
    return 0;
}

static void run(Loop *L) {
    uint8_t header[6];
    for (;;) {
        int next = next_header(L, header);
        if (next < 0) return;
        if (next > 0) { /* report what is stored */
            if (L->incoming) { /* with the dataset under way, finished in Python */
                hand_over(L, 0, 0, NULL, 0);
                return;
            }
            if (L->command_len == 0) {
                L->kind = KIND_BATCH;
                return;
            }
            /* a command set in fragments: its rest first, then report */
            if (recv_exact(L, header, 6, 0) != 0) return;
        }
        int type = header[0];
        uint32_t length = be32(header + 2);
        if (type < 0x01 || type > 0x07) {
            fail(L, ERR_PROTOCOL, 0, "unknown PDU type 0x%02X", type);
            return;
        }
        if (length > L->limit) {
            fail(L, ERR_PROTOCOL, 0, "PDU of %u bytes is over the limit of %llu", length,
                 (unsigned long long)L->limit);
            return;
        }
        if (length > L->buffer_size) {
            uint8_t *grown = realloc(L->own_buffer, length);
            if (!grown) {
                fail(L, ERR_OS, ENOMEM, "%s", strerror(ENOMEM));
                return;
            }
            L->buffer = L->own_buffer = grown;
            L->buffer_size = length;
        }
        if (recv_exact(L, L->buffer, length, 1) != 0) return;
        if (type != 0x04) {
            L->kind = KIND_PDU;
            L->pdu_type = type;
            L->pdu_body = L->buffer;
            L->pdu_len = length;
            return;
        }
        if (pdata(L, L->buffer, length) != 0) return;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Python                                                                                        */

static PyObject *stored_list(Loop *L) {
    PyObject *list = PyList_New(L->n_stored);
    if (!list) return NULL;
    for (int i = 0; i < L->n_stored; i++) {
        Stored *s = &L->stored[i];
        PyObject *found = PyDict_New();
        if (!found) goto error;
        size_t at = 0;
        for (int w = 0; w < N_WANTED; w++) {
            if (!s->present[w]) continue;
            PyObject *value = PyBytes_FromStringAndSize((const char *)s->values + at, s->length[w]);
            at += s->length[w];
            if (!value || PyDict_SetItemString(found, WANTED_NAMES[w], value) < 0) {
                Py_XDECREF(value);
                Py_DECREF(found);
                goto error;
            }
            Py_DECREF(value);
        }
        PyObject *item = Py_BuildValue("(NiKd)", found, s->context_id,
                                       (unsigned long long)s->size, s->received_at);
        if (!item) goto error;
        PyList_SET_ITEM(list, i, item);
    }
    return list;
error:
    Py_DECREF(list);
    return NULL;
}

static int parse_contexts(PyObject *contexts, Context **out, int *count) {
    /* {context_id: (abstract: bytes, implicit: int, meta_head: bytes, meta_tail: bytes) | None} */
    if (!PyDict_Check(contexts)) {
        PyErr_SetString(PyExc_TypeError, "contexts must be a dict");
        return -1;
    }
    Py_ssize_t n = PyDict_Size(contexts), i = 0, pos = 0;
    Context *array = calloc(n ? (size_t)n : 1, sizeof *array);
    if (!array) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *key, *value;
    while (PyDict_Next(contexts, &pos, &key, &value)) {
        Context *c = &array[i++];
        c->id = (int)PyLong_AsLong(key);
        if (PyErr_Occurred()) goto error;
        if (value == Py_None) continue; /* accepted, not settled here (Verification) */
        const char *abstract, *head, *tail;
        Py_ssize_t abstract_len, head_len, tail_len;
        int implicit;
        if (!PyArg_ParseTuple(value, "y#iy#y#", &abstract, &abstract_len, &implicit, &head,
                              &head_len, &tail, &tail_len))
            goto error;
        if (abstract_len > (Py_ssize_t)MAX_UID || head_len + tail_len > 512) {
            PyErr_SetString(PyExc_ValueError, "a context's UID or file meta is too long");
            goto error;
        }
        c->fast = 1;
        c->implicit = implicit;
        memcpy(c->abstract, abstract, (size_t)abstract_len);
        c->abstract_len = (size_t)abstract_len;
        memcpy(c->meta_head, head, (size_t)head_len); /* (copied: used without the GIL) */
        c->meta_head_len = (size_t)head_len;
        memcpy(c->meta_tail, tail, (size_t)tail_len);
        c->meta_tail_len = (size_t)tail_len;
    }
    *out = array;
    *count = (int)n;
    return 0;
error:
    free(array);
    return -1;
}

static PyObject *py_receive(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"sock",         "buffer",      "limit",         "contexts",
                               "spool_dir",    "temp_prefix", "counter",       "spare",
                               "budget",       "max_instances", "max_seconds", "pause_seconds",
                               NULL};
    Loop L;
    memset(&L, 0, sizeof L);
    PyObject *contexts, *spare;
    Py_buffer buffer;
    const char *spool_dir, *temp_prefix;
    unsigned long long limit, budget;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iw*KOyyLOKidd", keywords, &L.sock, &buffer,
                                     &limit, &contexts, &spool_dir, &temp_prefix, &L.counter,
                                     &spare, &budget, &L.max_instances, &L.max_seconds,
                                     &L.pause_seconds))
        return NULL;
    PyObject *result = NULL, *stored = NULL, *detail = NULL, *spare_out = NULL;
    if (L.max_instances < 1 || buffer.len < 6) {
        PyErr_SetString(PyExc_ValueError, "max_instances must be at least 1, buffer 6 bytes");
        PyBuffer_Release(&buffer);
        return NULL;
    }
    L.limit = limit;
    L.budget = budget;
    L.spool_dir = spool_dir;
    L.temp_prefix = temp_prefix;
    L.fd = -1;
    L.spare_fd = -1;
    if (spare != Py_None) {
        const char *path;
        int fd;
        if (!PyArg_ParseTuple(spare, "yi", &path, &fd)) {
            PyBuffer_Release(&buffer);
            return NULL;
        }
        if (strlen(path) >= PATH_CAP) {
            PyErr_SetString(PyExc_ValueError, "spare path too long");
            close(fd);
            unlink(path);
            PyBuffer_Release(&buffer);
            return NULL;
        }
        strcpy(L.spare, path);
        L.spare_fd = fd; /* this call's now: handed back in the result, or closed and removed */
    }
    if (parse_contexts(contexts, &L.contexts, &L.n_contexts) < 0) goto done;
    L.buffer = buffer.buf;
    L.buffer_size = (uint64_t)buffer.len;
    L.stored = calloc((size_t)L.max_instances, sizeof *L.stored);
    if (!L.stored) {
        PyErr_NoMemory();
        goto done;
    }

    Py_BEGIN_ALLOW_THREADS
    run(&L);
    if ((L.kind == KIND_ERROR || L.kind == KIND_PDU) && L.incoming) {
        /* cut off: dropped, named in the closing row */
        memcpy(L.unfinished, L.uid, L.uid_len);
        L.unfinished[L.uid_len] = 0;
        drop_incoming_file(&L);
        reset_incoming(&L);
    }
    Py_END_ALLOW_THREADS

    stored = stored_list(&L);
    if (!stored) goto done;
    if (L.spare_fd >= 0) {
        spare_out = Py_BuildValue("(yi)", L.spare, L.spare_fd);
    } else {
        spare_out = Py_NewRef(Py_None);
    }
    if (!spare_out) goto done;
    switch (L.kind) {
    case KIND_BATCH:
        detail = PyTuple_New(0);
        break;
    case KIND_PDU:
        detail = Py_BuildValue("(iy#N)", L.pdu_type, (const char *)L.pdu_body,
                               (Py_ssize_t)L.pdu_len,
                               L.unfinished[0] ? PyUnicode_FromString(L.unfinished)
                                               : Py_NewRef(Py_None));
        break;
    case KIND_COMMAND:
        detail = Py_BuildValue("(iy#y#)", L.command_context,
                               (const char *)(L.command ? L.command : (const uint8_t *)""),
                               (Py_ssize_t)L.command_len, (const char *)L.rest,
                               (Py_ssize_t)L.rest_len);
        break;
    case KIND_DATASET:
        detail = Py_BuildValue("(iy#yiKy#iiy#d)", L.in_context->id,
                               (const char *)(L.command ? L.command : (const uint8_t *)""),
                               (Py_ssize_t)L.command_len, L.temp, L.fd, (unsigned long long)L.size,
                               (const char *)(L.head ? L.head : (const uint8_t *)""),
                               (Py_ssize_t)L.head_len, L.handover_complete, L.handover_errno,
                               (const char *)(L.rest ? L.rest : (const uint8_t *)""),
                               (Py_ssize_t)L.rest_len, L.received_at);
        break;
    default:
        detail = Py_BuildValue("(iisN)", L.error, L.error_errno, L.message,
                               L.unfinished[0] ? PyUnicode_FromString(L.unfinished)
                                               : Py_NewRef(Py_None));
        break;
    }
    if (!detail) goto done;
    result = Py_BuildValue("(iOLOKO)", L.kind, stored, L.counter, spare_out,
                           (unsigned long long)L.spent, detail);
    if (result) { /* the spare file and a handed-over dataset's file are the caller's now */
        L.spare_fd = -1;
        if (L.kind == KIND_DATASET) L.fd = -1;
    }
done:
    Py_XDECREF(stored);
    Py_XDECREF(spare_out);
    Py_XDECREF(detail);
    if (L.fd >= 0) drop_incoming_file(&L); /* (only when building the result failed) */
    if (L.spare_fd >= 0) {
        close(L.spare_fd);
        unlink(L.spare);
    }
    for (int i = 0; i < L.n_stored; i++) free(L.stored[i].values);
    free(L.pending.values);
    free(L.stored);
    free(L.own_buffer);
    PyBuffer_Release(&buffer);
    free(L.command);
    free(L.head);
    free(L.contexts);
    return result;
}

static PyObject *py_scan_header(PyObject *self, PyObject *args) {
    Py_buffer data;
    int implicit;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*p", &data, &implicit)) return NULL;
    Found f;
    uint64_t stop = 0;
    int r = scan((const uint8_t *)data.buf, (uint64_t)data.len, implicit, &f, &stop);
    PyObject *result;
    if (r == SCAN_OK) {
        PyObject *values = PyDict_New();
        for (int w = 0; values && w < N_WANTED; w++) {
            if (!f.present[w]) continue;
            PyObject *v = PyBytes_FromStringAndSize((const char *)data.buf + f.offset[w],
                                                    (Py_ssize_t)f.length[w]);
            if (!v || PyDict_SetItemString(values, WANTED_NAMES[w], v) < 0) {
                Py_XDECREF(v);
                Py_CLEAR(values);
                break;
            }
            Py_DECREF(v);
        }
        result = values ? Py_BuildValue("(sN)", "ok", values) : NULL;
    } else {
        result = Py_BuildValue("(sO)", r == SCAN_MORE ? "more" : "bad", Py_None);
    }
    PyBuffer_Release(&data);
    return result;
}

static PyObject *py_is_safe_uid(PyObject *self, PyObject *args) {
    const char *value;
    Py_ssize_t n;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#", &value, &n)) return NULL;
    return PyBool_FromLong(is_safe_uid((const uint8_t *)value, (size_t)n));
}

static PyMethodDef methods[] = {
    {"receive", (PyCFunction)(void (*)(void))py_receive, METH_VARARGS | METH_KEYWORDS,
     "Receive ordinary C-STOREs on a blocking socket until something is handed back."},
    {"scan_header", py_scan_header, METH_VARARGS,
     "The header walk of the loop, for tests: ('ok', values), ('more', None) or ('bad', None)."},
    {"is_safe_uid", py_is_safe_uid, METH_VARARGS, "The loop's UID check, for tests."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastscp",
    .m_doc = "The node's C-STORE receive loop in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastscp(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddIntConstant(m, "KIND_BATCH", KIND_BATCH) < 0 ||
        PyModule_AddIntConstant(m, "KIND_PDU", KIND_PDU) < 0 ||
        PyModule_AddIntConstant(m, "KIND_COMMAND", KIND_COMMAND) < 0 ||
        PyModule_AddIntConstant(m, "KIND_DATASET", KIND_DATASET) < 0 ||
        PyModule_AddIntConstant(m, "KIND_ERROR", KIND_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "ERR_CLOSED", ERR_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "ERR_CLOSED_MID_PDU", ERR_CLOSED_MID_PDU) < 0 ||
        PyModule_AddIntConstant(m, "ERR_TIMEOUT", ERR_TIMEOUT) < 0 ||
        PyModule_AddIntConstant(m, "ERR_OS", ERR_OS) < 0 ||
        PyModule_AddIntConstant(m, "ERR_PROTOCOL", ERR_PROTOCOL) < 0 ||
        PyModule_AddIntConstant(m, "MAX_COMMAND", MAX_COMMAND) < 0 ||
        PyModule_AddIntConstant(m, "HEAD_LIMIT", HEAD_LIMIT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
