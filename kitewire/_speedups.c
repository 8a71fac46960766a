/* The publisher's hot call in C: one Kite binary frame in, the RESP of its PUBLISHes and of
 * its {ns}:last HSET fields out.
 *
 * It runs the program that kitewire/codec.py compiles from its packet layout table (the
 * payload's constant byte chunks and its value slots), so both paths write the same bytes
 * by construction; tests/test_encoder.py checks that they do. kitewire/encoder.py chooses
 * this module when it was built, and the pure-Python path otherwise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define MAX_FIELDS 64
#define MAX_SLOTS 64
#define MAX_CHUNK 64
#define MAX_LENGTH 256 /* packet lengths above this are never a known layout */

enum { SLOT_U32, SLOT_U16, SLOT_F64, SLOT_U64, SLOT_U8 };

typedef struct {
    int nfields, nprices, nslots;
    int offsets[MAX_FIELDS], widths[MAX_FIELDS];
    int prices[MAX_FIELDS]; /* raw field index of each price */
    int has_ohlc, last_k, close_k;
    /* the payload with every constant chunk in place and zeros where the values go: one
     * memcpy per tick, then each value written at its fixed offset */
    unsigned char template[(MAX_SLOTS + 1) * MAX_CHUNK + MAX_SLOTS * 8];
    /* the value slots grouped by width (8, 4, 2, 1 bytes): offset in the payload, and index
     * of the value in the tick's sources (raw fields, prices, tradable, change, received,
     * seq, epoch) */
    int nwidth[4], slot_offset[4][MAX_SLOTS], slot_source[4][MAX_SLOTS];
    Py_ssize_t payload_len;
    char bulk_header[24]; /* "$<payload_len>\r\n" */
    int bulk_header_len;
} Layout;

/* token -> last sequence number given, the token's int object (made once, so the per-tick
 * dict lookups allocate nothing) and its payload in the last-value cache: open addressing,
 * linear probing, entries of 48 bytes in one array (a lookup touches one or two cache
 * lines, not one per field) */
typedef struct {
    PyObject *key; /* owned reference; NULL marks an empty slot */
    uint64_t seq;
    uint64_t claimed_at; /* the claimed dict's version when the token was last found in it */
    PyObject *cached; /* owned reference to the bytes last put in ``latest`` for it, or NULL */
    uint64_t cached_gen; /* the encoder's ``gen`` when ``cached`` was put there */
    uint32_t token;
} SeqEntry;

typedef struct {
    SeqEntry *entries;
    size_t mask, used;
} SeqTable;

/* murmur3's finaliser: tokens differ in their high bits (the exchange segment is the low
 * byte), so a plain multiplicative hash masked to its low bits would cluster them */
static inline size_t seq_home(uint32_t token, size_t mask) {
    uint32_t h = token;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h & mask;
}

/* Rehash into ``size`` slots (a power of two, at least twice the tokens held). */
static int seq_resize(SeqTable *t, size_t size) {
    SeqEntry *entries = PyMem_Calloc(size, sizeof(SeqEntry));
    if (entries == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; t->entries && i <= t->mask; i++) {
        if (t->entries[i].key == NULL) continue;
        size_t j = seq_home(t->entries[i].token, size - 1);
        while (entries[j].key != NULL) j = (j + 1) & (size - 1);
        entries[j] = t->entries[i];
    }
    PyMem_Free(t->entries);
    t->entries = entries;
    t->mask = size - 1;
    return 0;
}

static void seq_clear(SeqTable *t) {
    for (size_t i = 0; t->entries && i <= t->mask; i++) {
        Py_XDECREF(t->entries[i].key);
        Py_XDECREF(t->entries[i].cached);
    }
    PyMem_Free(t->entries);
    t->entries = NULL;
    t->mask = t->used = 0;
}

/* The slot holding ``token``, or -1. */
static inline Py_ssize_t seq_find(const SeqTable *t, uint32_t token) {
    if (t->entries == NULL) return -1;
    size_t i = seq_home(token, t->mask);
    while (t->entries[i].key != NULL) {
        if (t->entries[i].token == token) return (Py_ssize_t)i;
        i = (i + 1) & t->mask;
    }
    return -1;
}

/* Add ``token`` (not in the table) with its int object ``key`` (the reference is stolen);
 * its slot, or -1 on a memory error. */
static Py_ssize_t seq_insert(SeqTable *t, uint32_t token, PyObject *key) {
    if (t->entries == NULL || (t->used + 1) * 2 > t->mask + 1) {
        if (seq_resize(t, t->entries ? (t->mask + 1) * 2 : 1024) < 0) {
            Py_DECREF(key);
            return -1;
        }
    }
    size_t i = seq_home(token, t->mask);
    while (t->entries[i].key != NULL) i = (i + 1) & t->mask;
    t->entries[i] = (SeqEntry){key, 0, 0, NULL, 0, token};
    t->used++;
    return (Py_ssize_t)i;
}

/* Forget ``token`` (backward-shift deletion: no tombstones, lookups stay as short). */
static void seq_remove(SeqTable *t, uint32_t token) {
    Py_ssize_t found = seq_find(t, token);
    if (found < 0) return;
    size_t i = (size_t)found;
    Py_DECREF(t->entries[i].key);
    Py_XDECREF(t->entries[i].cached);
    t->used--;
    for (size_t j = i;;) {
        j = (j + 1) & t->mask;
        if (t->entries[j].key == NULL) break;
        size_t home = seq_home(t->entries[j].token, t->mask);
        /* the entry at j may move to the hole at i unless its home lies in (i, j] */
        int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (stays) continue;
        t->entries[i] = t->entries[j];
        i = j;
    }
    t->entries[i] = (SeqEntry){NULL, 0, 0, NULL, 0, 0};
}

typedef struct {
    PyObject_HEAD
    Layout *layouts[MAX_LENGTH];
    SeqTable seqs;
    PyObject *claimed; /* tokens whose packets are published; NULL: all */
    /* The last-value cache dict's version when the current generation of the entries'
     * ``cached`` began, and that generation: a new one begins whenever the dict is found in
     * another state (changed by anyone, this encoder's own insertions included, or another
     * dict: versions are unique across dicts too). */
    uint64_t latest_version, gen;
    /* inside encode(): Python code it runs (a container's __contains__, a finaliser, a gc
     * callback) may not call encode, release, set_claimed or __init__ of this encoder,
     * which would change the table and layouts under the call's pointers */
    int busy;
    Py_ssize_t unclaimed; /* packets skipped: their token was not in ``claimed`` */
    uint64_t epoch;
    char command[64]; /* "*3\r\n$7\r\nPUBLISH\r\n" */
    int command_len;
    char prefix[256]; /* channel prefix, e.g. "kite:ticks:" */
    int prefix_len;
} Encoder;

static double divisor_of(uint32_t token) {
    switch (token & 0xFF) {
    case 3: return 10000000.0; /* cds */
    case 6: case 12: return 10000.0; /* bcd, nco */
    default: return 100.0;
    }
}

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t bits_of(double d) {
    uint64_t bits;
    memcpy(&bits, &d, 8);
    return bits;
}

static int slot_code_of(PyObject *code) {
    const char *s = PyUnicode_AsUTF8(code);
    if (s == NULL) return -1;
    if (strcmp(s, "I") == 0) return SLOT_U32;
    if (strcmp(s, "H") == 0) return SLOT_U16;
    if (strcmp(s, "d") == 0) return SLOT_F64;
    if (strcmp(s, "Q") == 0) return SLOT_U64;
    if (strcmp(s, "B") == 0) return SLOT_U8;
    PyErr_Format(PyExc_ValueError, "unknown slot code %s", s);
    return -1;
}

static const int SLOT_WIDTH[] = {4, 2, 8, 8, 1};
static const int SLOT_GROUP[] = {1, 2, 0, 0, 3}; /* index of the width in Layout.nwidth */

/* One layout of packets ``length`` bytes long from a tuple: (field_offsets, price_fields,
 * has_ohlc, last_k, close_k, chunks, slot_specs), each as kitewire/codec.py's
 * _PayloadWriter holds them. Every index and offset is checked: encode() trusts them. */
static Layout *layout_from(PyObject *spec, long length) {
    PyObject *given[4], *offsets = NULL, *prices = NULL, *chunks = NULL, *slots = NULL;
    int has_ohlc, last_k, close_k;
    if (!PyArg_ParseTuple(spec, "O!O!piiO!O!", &PyList_Type, &given[0], &PyList_Type, &given[1],
                          &has_ohlc, &last_k, &close_k, &PyList_Type, &given[2], &PyList_Type, &given[3]))
        return NULL;
    Layout *l = PyMem_Calloc(1, sizeof(Layout));
    if (l == NULL) { PyErr_NoMemory(); return NULL; }
    /* copies nobody else holds: an item's __index__ could change the lists given */
    if ((offsets = PyList_GetSlice(given[0], 0, PY_SSIZE_T_MAX)) == NULL
        || (prices = PyList_GetSlice(given[1], 0, PY_SSIZE_T_MAX)) == NULL
        || (chunks = PyList_GetSlice(given[2], 0, PY_SSIZE_T_MAX)) == NULL
        || (slots = PyList_GetSlice(given[3], 0, PY_SSIZE_T_MAX)) == NULL)
        goto fail;
    l->has_ohlc = has_ohlc; l->last_k = last_k; l->close_k = close_k;
    l->nfields = (int)PyList_Size(offsets);
    l->nprices = (int)PyList_Size(prices);
    l->nslots = (int)PyList_Size(slots);
    if (l->nfields < 0 || l->nprices < 0 || l->nslots < 0 || l->nfields > MAX_FIELDS
        || l->nprices > MAX_FIELDS || l->nslots > MAX_SLOTS || PyList_Size(chunks) != l->nslots + 1) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "layout program out of bounds");
        goto fail;
    }
    for (int i = 0; i < l->nfields; i++) {
        if (!PyArg_ParseTuple(PyList_GET_ITEM(offsets, i), "ii", &l->offsets[i], &l->widths[i]))
            goto fail;
        if ((l->widths[i] != 2 && l->widths[i] != 4) || l->offsets[i] < 0
            || l->offsets[i] > length - l->widths[i] || (i == 0 && (l->offsets[0] != 0 || l->widths[0] != 4))) {
            PyErr_SetString(PyExc_ValueError, "field outside the packet (the first must be the token)");
            goto fail;
        }
    }
    if (l->nfields == 0) {
        PyErr_SetString(PyExc_ValueError, "a layout without fields");
        goto fail;
    }
    for (int i = 0; i < l->nprices; i++) {
        l->prices[i] = (int)PyLong_AsLong(PyList_GET_ITEM(prices, i));
        if (PyErr_Occurred()) goto fail;
        if (l->prices[i] < 0 || l->prices[i] >= l->nfields) {
            PyErr_SetString(PyExc_ValueError, "price field out of range");
            goto fail;
        }
    }
    int nsources = l->nfields + l->nprices + 5; /* + tradable, change, received, seq, epoch */
    Py_ssize_t total = 0;
    for (int i = 0; i <= l->nslots; i++) {
        char *data; Py_ssize_t n;
        if (PyBytes_AsStringAndSize(PyList_GET_ITEM(chunks, i), &data, &n) < 0) goto fail;
        if (n > MAX_CHUNK) { PyErr_SetString(PyExc_ValueError, "chunk too long"); goto fail; }
        memcpy(l->template + total, data, n);
        total += n;
        if (i == l->nslots) break;
        PyObject *code;
        int source, kind;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(slots, i), "Oi", &code, &source)) goto fail;
        if ((kind = slot_code_of(code)) < 0) goto fail;
        if (source < 0 || source >= nsources) {
            PyErr_SetString(PyExc_ValueError, "slot source out of range");
            goto fail;
        }
        int group = SLOT_GROUP[kind], at = l->nwidth[group]++;
        l->slot_offset[group][at] = (int)total;
        l->slot_source[group][at] = source;
        total += SLOT_WIDTH[kind];
    }
    l->payload_len = total;
    l->bulk_header_len = snprintf(l->bulk_header, sizeof l->bulk_header, "$%zd\r\n", total);
    goto done;
fail:
    PyMem_Free(l);
    l = NULL;
done:
    Py_XDECREF(offsets);
    Py_XDECREF(prices);
    Py_XDECREF(chunks);
    Py_XDECREF(slots);
    return l;
}

static int refuse_if_busy(Encoder *self) {
    if (!self->busy) return 0;
    PyErr_SetString(PyExc_RuntimeError, "the encoder was called from inside its own encode()");
    return -1;
}

static void Encoder_dealloc(Encoder *self) {
    for (int i = 0; i < MAX_LENGTH; i++) PyMem_Free(self->layouts[i]);
    seq_clear(&self->seqs);
    Py_CLEAR(self->claimed);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Encoder_init(Encoder *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"layouts", "command", "channel_prefix", "epoch", NULL};
    PyObject *layouts;
    const char *command, *prefix;
    Py_ssize_t command_len, prefix_len;
    unsigned long long epoch = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!y#y#|K", kwlist, &PyDict_Type, &layouts, &command,
                                     &command_len, &prefix, &prefix_len, &epoch))
        return -1;
    if (refuse_if_busy(self) < 0) return -1;
    self->epoch = epoch;
    if (command_len > 40 || prefix_len > 200) {
        PyErr_SetString(PyExc_ValueError, "command or channel prefix too long");
        return -1;
    }
    self->command_len = snprintf(self->command, sizeof self->command, "*3\r\n$%zd\r\n%.*s\r\n",
                                 command_len, (int)command_len, command);
    memcpy(self->prefix, prefix, prefix_len);
    self->prefix_len = (int)prefix_len;
    /* a copy of the items: a key's __index__ could change the dict under PyDict_Next */
    PyObject *items = PyDict_Items(layouts);
    if (items == NULL) return -1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *item = PyList_GET_ITEM(items, i); /* a (length, spec) tuple */
        long length = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        if (length == -1 && PyErr_Occurred()) goto fail;
        if (length <= 0 || length >= MAX_LENGTH) {
            PyErr_SetString(PyExc_ValueError, "packet length out of range");
            goto fail;
        }
        Layout *l = layout_from(PyTuple_GET_ITEM(item, 1), length);
        if (l == NULL) goto fail;
        PyMem_Free(self->layouts[length]);
        self->layouts[length] = l;
    }
    Py_DECREF(items);
    return 0;
fail:
    Py_DECREF(items);
    return -1;
}

static inline int u32_digits(uint32_t v) {
    int n = 1;
    while (v >= 10) { v /= 10; n++; }
    return n;
}

static inline char *put_uint(char *out, uint64_t v) {
    char tmp[24];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) *out++ = tmp[--n];
    return out;
}

/* The version of a dict: CPython (before 3.12) gives every dict a tag that changes with
 * each insertion, deletion or update, from one counter for all dicts (a new dict takes the
 * next one too), so no two states of any dicts share one. So a token found
 * claimed under a tag is still claimed while the tag stands, and a value this encoder put
 * in the cache is still there. 0: no such tag (any other container, or a Python without
 * it): look up every time. */
static inline uint64_t dict_version(PyObject *dict) {
#if PY_VERSION_HEX < 0x030C0000
    if (dict != NULL && PyDict_CheckExact(dict)) return ((PyDictObject *)dict)->ma_version_tag;
#endif
    (void)dict;
    return 0;
}

static inline void overwrite(PyObject *bytes, const unsigned char *payload, Py_ssize_t len) {
    memcpy(PyBytes_AS_STRING(bytes), payload, len);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    ((PyBytesObject *)bytes)->ob_shash = -1;
#pragma GCC diagnostic pop
}

/* latest[key] = payload, for the token of entry ``e``. The value before is overwritten in
 * place when only the dict and the entry hold it and it has the same length (a token's
 * payloads in one mode all do): no allocation, free or insertion per tick. Bytes are
 * immutable to whoever can see them, and here nobody else can; the cached hash is reset
 * all the same.
 *
 * The dict is not even looked in while its version has not changed since the current
 * generation began and the entry's ``cached`` was found or put there in it: then it is
 * still the dict's value. Any change to the dict, by Python code between calls or inside
 * one (a gc callback, a container's ``__contains__``, a key's ``__eq__``, the finaliser of
 * a value this insertion dropped) or by this encoder's own insertion, gives it a new
 * version, so the next write begins a new generation and looks the dict up again. */
static int set_latest(Encoder *self, PyObject *latest, SeqEntry *e, const unsigned char *payload,
                      Py_ssize_t len) {
    uint64_t version = dict_version(latest);
    if (version == 0 || version != self->latest_version) {
        self->gen++; /* no entry's cached payload is known to be the dict's any more */
        self->latest_version = version;
    }
    PyObject *cached = e->cached;
    if (cached != NULL && e->cached_gen == self->gen && Py_REFCNT(cached) == 2
        && PyBytes_GET_SIZE(cached) == len) {
        overwrite(cached, payload, len);
        return 0;
    }
    PyObject *value = PyDict_GetItemWithError(latest, e->key);
    if (value == NULL && PyErr_Occurred()) return -1;
    if (value != NULL && PyBytes_CheckExact(value) && Py_REFCNT(value) == 1 + (value == cached)
        && PyBytes_GET_SIZE(value) == len) {
        overwrite(value, payload, len);
        Py_INCREF(value);
    } else {
        value = PyBytes_FromStringAndSize((const char *)payload, len);
        if (value == NULL) return -1;
        if (PyDict_SetItem(latest, e->key, value) < 0) {
            Py_DECREF(value);
            return -1;
        }
    }
    e->cached = value; /* the reference made above */
    e->cached_gen = self->gen;
    Py_XDECREF(cached);
    return 0;
}

/* encode(frame, received_at_ns, latest) -> (publishes, fields, ticks, malformed) */
static PyObject *Encoder_encode(Encoder *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode(frame, received_at_ns, latest)");
        return NULL;
    }
    PyObject *latest = args[2];
    if (!PyDict_Check(latest)) {
        PyErr_SetString(PyExc_TypeError, "latest must be a dict");
        return NULL;
    }
    uint64_t received = PyLong_AsUnsignedLongLong(args[1]);
    if (received == (uint64_t)-1 && PyErr_Occurred()) return NULL;
    if (!PyObject_CheckBuffer(args[0])) {
        PyErr_SetString(PyExc_TypeError, "frame must be bytes-like");
        return NULL;
    }
    if (refuse_if_busy(self) < 0) return NULL;
    /* bytes, because the frame is read twice and Python code can run in between (see
     * set_latest): a bytearray changed between the passes would outgrow the output's bound */
    PyObject *frame_bytes = PyBytes_FromObject(args[0]); /* bytes itself: a new reference */
    if (frame_bytes == NULL) return NULL;
    self->busy = 1;
    const unsigned char *frame = (const unsigned char *)PyBytes_AS_STRING(frame_bytes);
    Py_ssize_t size = PyBytes_GET_SIZE(frame_bytes);
    PyObject *resp = NULL, *fields = NULL, *result = NULL;
    Py_ssize_t ticks = 0, malformed = 0, bound = 0, fields_bound = 0;
    unsigned count = size >= 2 ? ((unsigned)frame[0] << 8 | frame[1]) : 0;

    /* Pass 1: find the packets (as codec.scan_frame does) and bound the output. */
    Py_ssize_t pos = 2;
    unsigned seen;
    for (seen = 0; seen < count; seen++) {
        if (pos + 2 > size) break;
        unsigned length = (unsigned)frame[pos] << 8 | frame[pos + 1];
        pos += 2 + length;
        if (pos > size) break;
        Layout *l = length < MAX_LENGTH ? self->layouts[length] : NULL;
        if (l == NULL) { malformed++; continue; }
        ticks++;
        /* the token's table entry, on its way to the cache by the time pass 2 needs it */
        if (self->seqs.entries != NULL)
            __builtin_prefetch(&self->seqs.entries[seq_home(be32(frame + pos - length), self->seqs.mask)]);
        bound += self->command_len + 24 + self->prefix_len + l->bulk_header_len + l->payload_len + 2;
        fields_bound += 20 + l->bulk_header_len + l->payload_len + 2;
    }
    malformed += count - seen;

    resp = PyBytes_FromStringAndSize(NULL, bound);
    fields = PyBytes_FromStringAndSize(NULL, fields_bound);
    if (resp == NULL || fields == NULL) goto done;
    char *out = PyBytes_AS_STRING(resp);
    char *fout = PyBytes_AS_STRING(fields);

    /* Pass 2: write each known packet's payload and its PUBLISH. */
    uint64_t vals[2 * MAX_FIELDS + 5]; /* raw fields, prices, then the derived values */
    pos = 2;
    Py_ssize_t known = ticks;
    ticks = 0;
    for (Py_ssize_t done_known = 0; done_known < known;) {
        unsigned length = (unsigned)frame[pos] << 8 | frame[pos + 1];
        const unsigned char *body = frame + pos + 2;
        pos += 2 + length;
        Layout *l = length < MAX_LENGTH ? self->layouts[length] : NULL;
        if (l == NULL) continue;
        done_known++;
        for (int i = 0; i < l->nfields; i++) {
            const unsigned char *p = body + l->offsets[i];
            vals[i] = l->widths[i] == 4 ? be32(p) : ((uint32_t)p[0] << 8 | p[1]);
        }
        uint32_t token = (uint32_t)vals[0];
        /* read again for every packet: Python code run by the last one may have changed it */
        uint64_t version = dict_version(self->claimed);
        Py_ssize_t slot = seq_find(&self->seqs, token);
        PyObject *key = slot >= 0 ? self->seqs.entries[slot].key : PyLong_FromUnsignedLong(token);
        if (key == NULL) goto done;
        int known_claimed = slot >= 0 && version != 0 && self->seqs.entries[slot].claimed_at == version;
        if (self->claimed != NULL && !known_claimed) {
            /* the book's placement, a dict: skip the abstract protocol's dispatch */
            int claimed = PyDict_CheckExact(self->claimed) ? PyDict_Contains(self->claimed, key)
                                                            : PySequence_Contains(self->claimed, key);
            if (claimed <= 0) {
                if (slot < 0) Py_DECREF(key);
                if (claimed < 0) goto done;
                self->unclaimed++;
                continue;
            }
        }
        if (slot < 0 && (slot = seq_insert(&self->seqs, token, key)) < 0) goto done;
        self->seqs.entries[slot].claimed_at = version;
        uint64_t seq = ++self->seqs.entries[slot].seq; /* key is now the table's (borrowed here) */
        ticks++;
        /* every value a slot can take, as the bits it is written with */
        double div = divisor_of(token);
        uint64_t *derived = vals + l->nfields + l->nprices;
        double last = 0.0, close = 0.0;
        for (int k = 0; k < l->nprices; k++) {
            double price = (double)vals[l->prices[k]] / div;
            if (k == l->last_k) last = price;
            if (k == l->close_k) close = price;
            vals[l->nfields + k] = bits_of(price);
        }
        double change = 0.0;
        if (l->has_ohlc && close != 0.0) change = (last - close) * 100.0 / close;
        derived[0] = (token & 0xFF) == 9 ? 0xC2 : 0xC3; /* tradable: false for indices */
        derived[1] = bits_of(change);
        derived[2] = received;
        derived[3] = seq;
        derived[4] = self->epoch;

        /* *3 $7 PUBLISH $<n> <prefix><token> $<len> <payload> */
        memcpy(out, self->command, self->command_len);
        out += self->command_len;
        *out++ = '$';
        out = put_uint(out, (uint64_t)self->prefix_len + u32_digits(token));
        *out++ = '\r'; *out++ = '\n';
        memcpy(out, self->prefix, self->prefix_len);
        out = put_uint(out + self->prefix_len, token);
        *out++ = '\r'; *out++ = '\n';
        memcpy(out, l->bulk_header, l->bulk_header_len);
        out += l->bulk_header_len;
        unsigned char *payload = (unsigned char *)out;
        memcpy(payload, l->template, l->payload_len);
        for (int i = 0; i < l->nwidth[0]; i++) {
            uint64_t v = __builtin_bswap64(vals[l->slot_source[0][i]]);
            memcpy(payload + l->slot_offset[0][i], &v, 8);
        }
        for (int i = 0; i < l->nwidth[1]; i++) {
            uint32_t v = __builtin_bswap32((uint32_t)vals[l->slot_source[1][i]]);
            memcpy(payload + l->slot_offset[1][i], &v, 4);
        }
        for (int i = 0; i < l->nwidth[2]; i++) {
            uint16_t v = __builtin_bswap16((uint16_t)vals[l->slot_source[2][i]]);
            memcpy(payload + l->slot_offset[2][i], &v, 2);
        }
        for (int i = 0; i < l->nwidth[3]; i++)
            payload[l->slot_offset[3][i]] = (unsigned char)vals[l->slot_source[3][i]];
        out += l->payload_len;
        *out++ = '\r'; *out++ = '\n';

        /* the HSET field and value: $<n> <token> $<len> <payload> */
        *fout++ = '$';
        fout = put_uint(fout, u32_digits(token));
        *fout++ = '\r'; *fout++ = '\n';
        fout = put_uint(fout, token);
        *fout++ = '\r'; *fout++ = '\n';
        memcpy(fout, l->bulk_header, l->bulk_header_len);
        fout += l->bulk_header_len;
        memcpy(fout, payload, l->payload_len);
        fout += l->payload_len;
        *fout++ = '\r'; *fout++ = '\n';

        if (set_latest(self, latest, &self->seqs.entries[slot], payload, l->payload_len) < 0) goto done;
    }
    if (_PyBytes_Resize(&resp, out - PyBytes_AS_STRING(resp)) < 0) goto done;
    if (_PyBytes_Resize(&fields, fout - PyBytes_AS_STRING(fields)) < 0) goto done;
    result = Py_BuildValue("(OOnn)", resp, fields, ticks, malformed);
done:
    Py_XDECREF(resp);
    Py_XDECREF(fields);
    Py_DECREF(frame_bytes);
    self->busy = 0;
    return result;
}

static PyObject *Encoder_set_claimed(Encoder *self, PyObject *claimed) {
    if (refuse_if_busy(self) < 0) return NULL;
    PyObject *old = self->claimed;
    if (claimed == Py_None) {
        self->claimed = NULL;
    } else {
        Py_INCREF(claimed);
        self->claimed = claimed;
    }
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *Encoder_release(Encoder *self, PyObject *tokens) {
    if (refuse_if_busy(self) < 0) return NULL;
    PyObject *it = PyObject_GetIter(tokens);
    if (it == NULL) return NULL;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        unsigned long token = PyLong_AsUnsignedLong(item);
        Py_DECREF(item);
        if (token == (unsigned long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) break;
            PyErr_Clear(); /* no such token can be in the table */
            continue;
        }
        if (token <= 0xFFFFFFFFul) seq_remove(&self->seqs, (uint32_t)token);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return NULL;
    SeqTable *t = &self->seqs;
    /* give memory back once the table is mostly empty (never below the first size) */
    size_t size = t->entries ? t->mask + 1 : 0;
    if (size > 1024 && t->used * 8 < size) {
        size_t smaller = 1024;
        while (smaller < t->used * 4) smaller *= 2;
        if (seq_resize(t, smaller) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Encoder_tracked(Encoder *self, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSize_t(self->seqs.used);
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)(void (*)(void))Encoder_encode, METH_FASTCALL,
     "encode(frame, received_at_ns, latest) -> (publishes, fields, ticks, malformed)"},
    {"set_claimed", (PyCFunction)Encoder_set_claimed, METH_O,
     "set_claimed(container or None): publish only packets of these tokens"},
    {"release", (PyCFunction)Encoder_release, METH_O, "release(tokens): forget their sequence numbers"},
    {"tracked", (PyCFunction)Encoder_tracked, METH_NOARGS, "tracked() -> tokens in the sequence table"},
    {NULL},
};

static PyMemberDef Encoder_members[] = {
    {"unclaimed", T_PYSSIZET, offsetof(Encoder, unclaimed), READONLY,
     "packets skipped: their token was not claimed"},
    {NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kitewire._speedups.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Compiled frame -> RESP encoder; see kitewire/encoder.py.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
    .tp_members = Encoder_members,
};

/* home_slot(token, mask): where the sequence table first looks for a token, for the tests
 * that need tokens sharing a slot */
static PyObject *home_slot(PyObject *Py_UNUSED(module), PyObject *args) {
    unsigned int token;
    Py_ssize_t mask;
    if (!PyArg_ParseTuple(args, "In", &token, &mask)) return NULL;
    return PyLong_FromSize_t(seq_home(token, (size_t)mask));
}

static PyMethodDef speedups_functions[] = {
    {"home_slot", home_slot, METH_VARARGS, "home_slot(token, mask) -> the token's first slot"},
    {NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "kitewire._speedups", "The publisher's hot path in C.", -1, speedups_functions,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
