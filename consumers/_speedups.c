/* The strategy side's hot call in C: a tick payload in, the tick dict out.
 *
 * It runs the programs consumers/payloads.py compiles from the codec's payload templates:
 * a payload of a known length whose constant bytes match (payload & mask == expected, a
 * word at a time) has its values read at fixed offsets and its dicts and lists built by a
 * small stack program; any other payload goes to the fallback (msgpack.unpackb). The
 * pure-Python decoder in consumers/payloads.py gives the same dicts; tests/test_payloads.py
 * checks both against msgpack.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_PROGRAMS 16
#define MAX_DEPTH 64

enum { OP_U32, OP_U16, OP_F64, OP_U64, OP_BOOL, OP_CONST, OP_DICT, OP_LIST };

typedef struct {
    int kind;
    Py_ssize_t offset; /* value ops: where the value is in the payload */
    Py_ssize_t n;      /* OP_DICT, OP_LIST: items popped */
    PyObject *obj;     /* OP_CONST: the value; OP_DICT: the keys (a tuple); owned */
} Op;

typedef struct {
    Py_ssize_t length;
    unsigned char *mask, *expected; /* length bytes each, padded with zeros to whole words */
    Py_ssize_t nops;
    Op *ops;
} Program;

typedef struct {
    PyObject_HEAD
    Program programs[MAX_PROGRAMS];
    int nprograms;
    PyObject *fallback;
} Decoder;

static void program_free(Program *p) {
    for (Py_ssize_t i = 0; i < p->nops; i++) Py_XDECREF(p->ops[i].obj);
    PyMem_Free(p->ops);
    PyMem_Free(p->mask);
    PyMem_Free(p->expected);
    memset(p, 0, sizeof(*p));
}

static int kind_of(PyObject *name, PyObject *code) {
    const char *n = PyUnicode_AsUTF8(name);
    if (n == NULL) return -1;
    if (strcmp(n, "c") == 0) return OP_CONST;
    if (strcmp(n, "d") == 0) return OP_DICT;
    if (strcmp(n, "l") == 0) return OP_LIST;
    if (strcmp(n, "v") != 0 || code == NULL) goto bad;
    const char *c = PyUnicode_AsUTF8(code);
    if (c == NULL) return -1;
    if (strcmp(c, "I") == 0) return OP_U32;
    if (strcmp(c, "H") == 0) return OP_U16;
    if (strcmp(c, "d") == 0) return OP_F64;
    if (strcmp(c, "Q") == 0) return OP_U64;
    if (strcmp(c, "B") == 0) return OP_BOOL;
bad:
    PyErr_SetString(PyExc_ValueError, "unknown op in a payload program");
    return -1;
}

static const Py_ssize_t widths[] = {4, 2, 8, 8, 1};

/* One program from (length, mask, expected, ops); checks that the ops stay inside the
 * payload and leave exactly one object on a stack of at most MAX_DEPTH. */
static int program_init(Program *p, PyObject *spec) {
    PyObject *mask, *expected, *ops;
    if (!PyArg_ParseTuple(spec, "nSSO!", &p->length, &mask, &expected, &PyList_Type, &ops)) return -1;
    if (p->length < 0 || PyBytes_GET_SIZE(mask) != p->length || PyBytes_GET_SIZE(expected) != p->length) {
        PyErr_SetString(PyExc_ValueError, "mask and expected must be the payload's length");
        return -1;
    }
    Py_ssize_t padded = (p->length + 7) / 8 * 8;
    p->mask = PyMem_Calloc(padded ? padded : 1, 1);
    p->expected = PyMem_Calloc(padded ? padded : 1, 1);
    p->nops = PyList_GET_SIZE(ops);
    p->ops = PyMem_Calloc(p->nops ? p->nops : 1, sizeof(Op));
    if (p->mask == NULL || p->expected == NULL || p->ops == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(p->mask, PyBytes_AS_STRING(mask), p->length);
    memcpy(p->expected, PyBytes_AS_STRING(expected), p->length);
    Py_ssize_t depth = 0;
    for (Py_ssize_t i = 0; i < p->nops; i++) {
        PyObject *item = PyList_GET_ITEM(ops, i);
        Py_ssize_t size = PyTuple_Check(item) ? PyTuple_GET_SIZE(item) : 0;
        if (size < 2 || size > 3) {
            PyErr_SetString(PyExc_ValueError, "an op is a tuple of two or three items");
            return -1;
        }
        int kind = kind_of(PyTuple_GET_ITEM(item, 0), size == 3 ? PyTuple_GET_ITEM(item, 1) : NULL);
        if (kind < 0) return -1;
        Op *op = &p->ops[i];
        op->kind = kind;
        PyObject *arg = PyTuple_GET_ITEM(item, size - 1);
        if (kind <= OP_BOOL) {
            op->offset = PyLong_AsSsize_t(arg);
            if (op->offset == -1 && PyErr_Occurred()) return -1;
            if (op->offset < 0 || op->offset + widths[kind] > p->length) {
                PyErr_SetString(PyExc_ValueError, "a value op reads outside the payload");
                return -1;
            }
        } else if (kind == OP_CONST) {
            op->obj = Py_NewRef(arg);
        } else if (kind == OP_DICT) {
            if (!PyTuple_Check(arg)) {
                PyErr_SetString(PyExc_ValueError, "a dict op's keys are a tuple");
                return -1;
            }
            op->n = PyTuple_GET_SIZE(arg);
            op->obj = PyTuple_New(op->n); /* the keys, interned with their hash cached */
            if (op->obj == NULL) return -1;
            for (Py_ssize_t k = 0; k < op->n; k++) {
                PyObject *key = PyTuple_GET_ITEM(arg, k);
                if (!PyUnicode_CheckExact(key)) {
                    PyErr_SetString(PyExc_ValueError, "a dict op's keys are str");
                    return -1;
                }
                Py_INCREF(key);
                PyUnicode_InternInPlace(&key);
                PyTuple_SET_ITEM(op->obj, k, key);
                if (PyObject_Hash(key) == -1) return -1;
            }
        } else {
            op->n = PyLong_AsSsize_t(arg);
            if (op->n == -1 && PyErr_Occurred()) return -1;
        }
        if (kind >= OP_DICT && (op->n < 0 || op->n > depth)) {
            PyErr_SetString(PyExc_ValueError, "a payload program pops more than it pushed");
            return -1;
        }
        depth += kind >= OP_DICT ? 1 - op->n : 1;
        if (depth > MAX_DEPTH) {
            PyErr_SetString(PyExc_ValueError, "a payload program's stack is too deep");
            return -1;
        }
    }
    if (depth != 1) {
        PyErr_SetString(PyExc_ValueError, "a payload program leaves exactly one object");
        return -1;
    }
    return 0;
}

static void Decoder_dealloc(Decoder *self) {
    for (int i = 0; i < self->nprograms; i++) program_free(&self->programs[i]);
    Py_XDECREF(self->fallback);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Decoder(programs, fallback): programs as consumers/payloads.programs() gives them. */
static int Decoder_init(Decoder *self, PyObject *args, PyObject *kwargs) {
    PyObject *programs, *fallback;
    static char *names[] = {"programs", "fallback", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O", names, &PyList_Type, &programs, &fallback))
        return -1;
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return -1;
    }
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    for (int i = 0; i < self->nprograms; i++) program_free(&self->programs[i]);
    self->nprograms = 0;
    if (PyList_GET_SIZE(programs) > MAX_PROGRAMS) {
        PyErr_SetString(PyExc_ValueError, "too many payload programs");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(programs); i++) {
        Program *p = &self->programs[self->nprograms++];
        if (program_init(p, PyList_GET_ITEM(programs, i)) < 0) return -1;
        for (int j = 0; j < self->nprograms - 1; j++) {
            if (self->programs[j].length == p->length) {
                PyErr_SetString(PyExc_ValueError, "two payload programs of one length");
                return -1;
            }
        }
    }
    return 0;
}

static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t be(const unsigned char *p, Py_ssize_t width) {
    uint64_t v = 0;
    for (Py_ssize_t i = 0; i < width; i++) v = (v << 8) | p[i];
    return v;
}

static int matches(const Program *p, const unsigned char *data) {
    Py_ssize_t whole = p->length / 8 * 8, i = 0;
    uint64_t diff = 0;
    for (; i < whole; i += 8) diff |= (load64(data + i) & load64(p->mask + i)) ^ load64(p->expected + i);
    for (; i < p->length; i++) diff |= (uint64_t)((data[i] & p->mask[i]) ^ p->expected[i]);
    return diff == 0;
}

static inline PyObject *new_dict(Py_ssize_t n) {
#if PY_VERSION_HEX < 0x030D0000
    return _PyDict_NewPresized(n); /* no resizing while the tick's 22 keys go in */
#else
    (void)n;
    return PyDict_New();
#endif
}

static PyObject *run(const Program *p, const unsigned char *data) {
    PyObject *stack[MAX_DEPTH];
    Py_ssize_t top = 0;
    for (Py_ssize_t i = 0; i < p->nops; i++) {
        const Op *op = &p->ops[i];
        PyObject *value;
        switch (op->kind) {
        case OP_U32:
        case OP_U16:
            value = PyLong_FromUnsignedLong((unsigned long)be(data + op->offset, widths[op->kind]));
            break;
        case OP_U64:
            value = PyLong_FromUnsignedLongLong(be(data + op->offset, 8));
            break;
        case OP_F64: {
            uint64_t bits = be(data + op->offset, 8);
            double d;
            memcpy(&d, &bits, 8);
            value = PyFloat_FromDouble(d);
            break;
        }
        case OP_BOOL:
            value = Py_NewRef(data[op->offset] == 0xC3 ? Py_True : Py_False);
            break;
        case OP_CONST:
            value = Py_NewRef(op->obj);
            break;
        case OP_DICT: {
            value = new_dict(op->n);
            if (value == NULL) break;
            PyObject **items = stack + top - op->n;
            for (Py_ssize_t k = 0; k < op->n; k++) {
                if (PyDict_SetItem(value, PyTuple_GET_ITEM(op->obj, k), items[k]) < 0) {
                    Py_CLEAR(value);
                    break;
                }
            }
            if (value == NULL) break;
            for (Py_ssize_t k = 0; k < op->n; k++) Py_DECREF(items[k]);
            top -= op->n;
            break;
        }
        default: /* OP_LIST */
            value = PyList_New(op->n);
            if (value == NULL) break;
            top -= op->n;
            for (Py_ssize_t k = 0; k < op->n; k++) PyList_SET_ITEM(value, k, stack[top + k]); /* stolen */
            break;
        }
        if (value == NULL) {
            while (top > 0) Py_DECREF(stack[--top]);
            return NULL;
        }
        stack[top++] = value;
    }
    return stack[0];
}

/* decode(payload) -> the tick dict msgpack.unpackb(payload) gives */
static PyObject *Decoder_decode(Decoder *self, PyObject *payload) {
    if (self->fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Decoder() was not initialised");
        return NULL;
    }
    if (PyBytes_CheckExact(payload)) {
        Py_ssize_t length = PyBytes_GET_SIZE(payload);
        const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(payload);
        for (int i = 0; i < self->nprograms; i++) {
            const Program *p = &self->programs[i];
            if (p->length == length) {
                if (matches(p, data)) return run(p, data);
                break;
            }
        }
    }
    return PyObject_CallOneArg(self->fallback, payload);
}

static PyMethodDef Decoder_methods[] = {
    {"decode", (PyCFunction)Decoder_decode, METH_O, "decode(payload) -> tick dict"},
    {NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "consumers._speedups.Decoder",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Compiled payload -> tick dict decoder; see consumers/payloads.py.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Decoder_init,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_methods = Decoder_methods,
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "consumers._speedups", "The strategy side's hot path in C.", -1, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (PyType_Ready(&DecoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL) return NULL;
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(m, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
