/* The inference service's per-call hot path in C: agent.fastpath loads it, agent/inference.py,
 * agent/latency.py and agent/runtimes.py use it when it is built and keep pure-Python twins of
 * every piece with the same behaviour (the tests run both).
 *
 * What lives here: a lock cheap to take from C (Lock), the counters of one loaded model
 * (ModelState), the latency ring's store (LatencyRing), the drift buffer's preallocated row
 * block (RowBlock), the service's predict for the common request (Predictor: a C-contiguous
 * float32 batch of the model's width, finite unless allowed) and LiteRT's
 * SetTensor/Invoke/GetTensor sequence under the runtime's lock (LiteRtRunner). Anything else
 * (a batch that needs converting or refusing, no model, a retiring model, a batch size LiteRT
 * must be resized for, a closed runtime) is handed to the Python implementation, which is the
 * reference: this file only takes the calls whose outcome it can reproduce exactly.
 *
 * What does not live here: validation messages, drift binning, LiteRT's resize, any runtime's
 * C API (LiteRT is called through its interpreter wrapper's Python methods, as
 * agent/runtimes.py calls them), and no numpy headers: the build needs only Python's headers.
 * numpy arrays are read through numpy's public, stable PyArrayObject_fields layout, which
 * agent.fastpath checks against numpy itself before enabling anything (see layout()).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <string.h>
#include <stdint.h>
#include <time.h>

/* numpy/ndarraytypes.h PyArrayObject_fields, first fields (the same from numpy 1.7 to 2.x) */
typedef struct {
    PyObject_HEAD
    char *data;
    int nd;
    Py_ssize_t *dimensions;
    Py_ssize_t *strides;
    PyObject *base;
    PyObject *descr;
    int flags;
} ArrayFields;

/* bump with every change of what the Python side expects of this module */
#define FASTPATH_INTERFACE 1

#define NPY_C_CONTIGUOUS 0x0001
#define NPY_ALIGNED 0x0100
#define ARR(o) ((ArrayFields *)(o))

/* set by configure(): numpy.ndarray and numpy.dtype(numpy.float32) */
static PyTypeObject *ndarray_type = NULL;
static PyObject *float32_descr = NULL;

/* an exact ndarray of float32, 2-D, C-contiguous and aligned: its rows are plain floats */
static inline int
is_plain_f32_2d(PyObject *o)
{
    return Py_TYPE(o) == ndarray_type && ARR(o)->descr == float32_descr && ARR(o)->nd == 2 &&
           (ARR(o)->flags & (NPY_C_CONTIGUOUS | NPY_ALIGNED)) == (NPY_C_CONTIGUOUS | NPY_ALIGNED);
}

static inline double
now_seconds(void)
{
    /* time.perf_counter's clock on Linux */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* --- Lock --------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    char locked;
} LockObject;

static PyTypeObject LockType;

/* Take the lock from C; waits with the GIL released (its holder may be running Python). */
static int
lock_take(LockObject *self)
{
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        PyLockStatus r;
        do {
            Py_BEGIN_ALLOW_THREADS
            r = PyThread_acquire_lock_timed(self->lock, -1, 1);
            Py_END_ALLOW_THREADS
            if (r == PY_LOCK_INTR && Py_MakePendingCalls() < 0) {
                return -1;
            }
        } while (r != PY_LOCK_ACQUIRED);
    }
    self->locked = 1;
    return 0;
}

static inline void
lock_give(LockObject *self)
{
    self->locked = 0;
    PyThread_release_lock(self->lock);
}

static PyObject *
Lock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Lock() takes no arguments");
        return NULL;
    }
    LockObject *self = (LockObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->lock = PyThread_allocate_lock();
    if (self->lock == NULL) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_MemoryError, "cannot allocate a lock");
        return NULL;
    }
    return (PyObject *)self;
}

static void
Lock_dealloc(LockObject *self)
{
    if (self->lock != NULL) {
        if (self->locked) {
            PyThread_release_lock(self->lock);
        }
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Lock_acquire(LockObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pd:acquire", kwlist, &blocking, &timeout)) {
        return NULL;
    }
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    if (timeout < 0 && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    if (!blocking) {
        if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
            Py_RETURN_FALSE;
        }
        self->locked = 1;
        Py_RETURN_TRUE;
    }
    if (timeout == -1) {
        if (lock_take(self) < 0) {
            return NULL;
        }
        Py_RETURN_TRUE;
    }
    double deadline = now_seconds() + timeout;
    for (;;) {
        double left = deadline - now_seconds();
        PY_TIMEOUT_T us = left > 0 ? (PY_TIMEOUT_T)(left * 1e6) : 0;
        PyLockStatus r;
        Py_BEGIN_ALLOW_THREADS
        r = PyThread_acquire_lock_timed(self->lock, us, 1);
        Py_END_ALLOW_THREADS
        if (r == PY_LOCK_ACQUIRED) {
            self->locked = 1;
            Py_RETURN_TRUE;
        }
        if (r == PY_LOCK_INTR) {
            if (Py_MakePendingCalls() < 0) {
                return NULL;
            }
            continue;
        }
        Py_RETURN_FALSE;
    }
}

static PyObject *
Lock_enter(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (lock_take(self) < 0) {
        return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *
Lock_release(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->locked) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    lock_give(self);
    Py_RETURN_NONE;
}

static PyObject *
Lock_exit(LockObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return Lock_release(self, NULL);
}

static PyObject *
Lock_locked(LockObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->locked);
}

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))Lock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool, as threading.Lock"},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "release()"},
    {"locked", (PyCFunction)Lock_locked, METH_NOARGS, "locked() -> bool"},
    {"__enter__", (PyCFunction)Lock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Lock_exit, METH_FASTCALL, NULL},
    {NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.Lock",
    .tp_doc = "A non-reentrant lock like threading.Lock that C code takes without a call.",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Lock_new,
    .tp_dealloc = (destructor)Lock_dealloc,
    .tp_methods = Lock_methods,
};

/* --- LatencyRing -------------------------------------------------------------------------- */

/* The store side of agent.latency.LatencyRecorder: a Python subclass sets the fields and
 * implements _fold(end) and stats(); record() is the Python twin's, in C. */
typedef struct {
    PyObject_HEAD
    PyObject *ring; /* list of floats, ``size`` long */
    Py_ssize_t size;
    Py_ssize_t next;
    Py_ssize_t folded;
    PyObject *dict;
} RingObject;

static PyTypeObject RingType;
static PyObject *str_fold;

static int
ring_record(RingObject *self, double seconds)
{
    if (self->ring == NULL || !PyList_CheckExact(self->ring) ||
        PyList_GET_SIZE(self->ring) != self->size || self->next < 0 ||
        self->next >= self->size) {
        PyErr_SetString(PyExc_RuntimeError, "LatencyRing fields are inconsistent");
        return -1;
    }
    PyObject *value = PyFloat_FromDouble(seconds);
    if (value == NULL) {
        return -1;
    }
    Py_ssize_t i = self->next;
    PyObject *old = PyList_GET_ITEM(self->ring, i);
    PyList_SET_ITEM(self->ring, i, value);
    Py_XDECREF(old);
    i += 1;
    if (i == self->size) { /* the ring wraps: bin what it holds before it is overwritten */
        PyObject *end = PyLong_FromSsize_t(i);
        if (end == NULL) {
            return -1;
        }
        PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, str_fold, end);
        Py_DECREF(end);
        if (r == NULL) {
            return -1;
        }
        Py_DECREF(r);
        i = self->folded = 0;
    }
    self->next = i;
    return 0;
}

static PyObject *
Ring_record(RingObject *self, PyObject *arg)
{
    double seconds = PyFloat_AsDouble(arg);
    if (seconds == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    if (ring_record(self, seconds) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
Ring_traverse(RingObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->ring);
    Py_VISIT(self->dict);
    return 0;
}

static int
Ring_clear(RingObject *self)
{
    Py_CLEAR(self->ring);
    Py_CLEAR(self->dict);
    return 0;
}

static void
Ring_dealloc(RingObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Ring_clear(self);
    tp->tp_free((PyObject *)self); /* a Python subclass's dealloc drops its type itself */
}

static PyMethodDef Ring_methods[] = {
    {"record", (PyCFunction)Ring_record, METH_O, "record(seconds): keep one latency"},
    {NULL},
};

static PyMemberDef Ring_members[] = {
    {"_ring", T_OBJECT_EX, offsetof(RingObject, ring), 0, NULL},
    {"_size", T_PYSSIZET, offsetof(RingObject, size), 0, NULL},
    {"_next", T_PYSSIZET, offsetof(RingObject, next), 0, NULL},
    {"_folded", T_PYSSIZET, offsetof(RingObject, folded), 0, NULL},
    {NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.LatencyRing",
    .tp_doc = "The record side of a latency ring (agent.latency builds on it).",
    .tp_basicsize = sizeof(RingObject),
    .tp_dictoffset = offsetof(RingObject, dict),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)Ring_traverse,
    .tp_clear = (inquiry)Ring_clear,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_members = Ring_members,
};

/* --- RowBlock ----------------------------------------------------------------------------- */

/* The store side of agent.inference's block drift buffer: rows of served batches copied into
 * two preallocated bytearrays. A Python subclass allocates them, flushes and hands blocks on;
 * add_fast() here copies a batch when it can, else says so and the subclass's add() does it. */
typedef struct {
    PyObject_HEAD
    PyObject *in_block;  /* bytearray of capacity * in_width float32 */
    PyObject *out_block; /* bytearray of capacity * out_width float32 */
    Py_ssize_t in_width;
    Py_ssize_t out_width;
    Py_ssize_t capacity; /* rows the blocks hold */
    Py_ssize_t fill;     /* rows held */
    Py_ssize_t limit;    /* flush once this many rows are held */
    Py_ssize_t direct;   /* batches of this many rows go on without a copy (Python add) */
    PyObject *dict;
} BlockObject;

static PyTypeObject BlockType;
static PyObject *str_flush;
static PyObject *str_add;

/* 1: copied (and flushed if full); 0: not for this path, nothing done; -1: error */
static int
block_add_fast(BlockObject *self, PyObject *x, PyObject *y)
{
    if (!is_plain_f32_2d(x) || !is_plain_f32_2d(y)) {
        return 0;
    }
    Py_ssize_t n = ARR(x)->dimensions[0];
    if (n >= self->direct || n != ARR(y)->dimensions[0] ||
        ARR(x)->dimensions[1] != self->in_width || ARR(y)->dimensions[1] != self->out_width ||
        self->fill + n > self->capacity || self->in_block == NULL || self->out_block == NULL ||
        !PyByteArray_CheckExact(self->in_block) || !PyByteArray_CheckExact(self->out_block) ||
        PyByteArray_GET_SIZE(self->in_block) < self->capacity * self->in_width * 4 ||
        PyByteArray_GET_SIZE(self->out_block) < self->capacity * self->out_width * 4) {
        return 0;
    }
    memcpy(PyByteArray_AS_STRING(self->in_block) + self->fill * self->in_width * 4,
           ARR(x)->data, (size_t)(n * self->in_width * 4));
    memcpy(PyByteArray_AS_STRING(self->out_block) + self->fill * self->out_width * 4,
           ARR(y)->data, (size_t)(n * self->out_width * 4));
    self->fill += n;
    if (self->fill >= self->limit) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, str_flush);
        if (r == NULL) {
            return -1;
        }
        Py_DECREF(r);
    }
    return 1;
}

static PyObject *
Block_add_fast(BlockObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add_fast(inputs, outputs)");
        return NULL;
    }
    int r = block_add_fast(self, args[0], args[1]);
    if (r < 0) {
        return NULL;
    }
    return PyBool_FromLong(r);
}

static int
Block_traverse(BlockObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->in_block);
    Py_VISIT(self->out_block);
    Py_VISIT(self->dict);
    return 0;
}

static int
Block_clear(BlockObject *self)
{
    Py_CLEAR(self->in_block);
    Py_CLEAR(self->out_block);
    Py_CLEAR(self->dict);
    return 0;
}

static void
Block_dealloc(BlockObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Block_clear(self);
    tp->tp_free((PyObject *)self); /* a Python subclass's dealloc drops its type itself */
}

static PyMethodDef Block_methods[] = {
    {"add_fast", (PyCFunction)(void (*)(void))Block_add_fast, METH_FASTCALL,
     "add_fast(inputs, outputs) -> bool: copy a plain float32 batch's rows if they fit"},
    {NULL},
};

static PyMemberDef Block_members[] = {
    {"_in_block", T_OBJECT, offsetof(BlockObject, in_block), 0, NULL},
    {"_out_block", T_OBJECT, offsetof(BlockObject, out_block), 0, NULL},
    {"_in_width", T_PYSSIZET, offsetof(BlockObject, in_width), 0, NULL},
    {"_out_width", T_PYSSIZET, offsetof(BlockObject, out_width), 0, NULL},
    {"_capacity", T_PYSSIZET, offsetof(BlockObject, capacity), 0, NULL},
    {"fill", T_PYSSIZET, offsetof(BlockObject, fill), 0, NULL},
    {"limit", T_PYSSIZET, offsetof(BlockObject, limit), 0, NULL},
    {"_direct", T_PYSSIZET, offsetof(BlockObject, direct), 0, NULL},
    {NULL},
};

static PyTypeObject BlockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.RowBlock",
    .tp_doc = "The store side of a drift buffer (agent.inference builds on it).",
    .tp_basicsize = sizeof(BlockObject),
    .tp_dictoffset = offsetof(BlockObject, dict),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_traverse = (traverseproc)Block_traverse,
    .tp_clear = (inquiry)Block_clear,
    .tp_dealloc = (destructor)Block_dealloc,
    .tp_methods = Block_methods,
    .tp_members = Block_members,
};

/* --- ModelState --------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *lock; /* a Lock */
    Py_ssize_t requests;
    Py_ssize_t rows;
    Py_ssize_t rejected;
    Py_ssize_t errors;
    Py_ssize_t in_flight;
    char retiring;
    PyObject *latency; /* a LatencyRing subclass (or anything with record()) */
    PyObject *drift;   /* a drift buffer or None */
    PyObject *dict;
} StateObject;

static PyTypeObject StateType;

static int
State_init(StateObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"lock", "latency", "drift", NULL};
    PyObject *lock, *latency, *drift;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO:ModelState", kwlist, &LockType, &lock,
                                     &latency, &drift)) {
        return -1;
    }
    Py_XSETREF(self->lock, Py_NewRef(lock));
    Py_XSETREF(self->latency, Py_NewRef(latency));
    Py_XSETREF(self->drift, Py_NewRef(drift));
    self->requests = self->rows = self->rejected = self->errors = self->in_flight = 0;
    self->retiring = 0;
    return 0;
}

static int
State_traverse(StateObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->lock);
    Py_VISIT(self->latency);
    Py_VISIT(self->drift);
    Py_VISIT(self->dict);
    return 0;
}

static int
State_clear(StateObject *self)
{
    Py_CLEAR(self->lock);
    Py_CLEAR(self->latency);
    Py_CLEAR(self->drift);
    Py_CLEAR(self->dict);
    return 0;
}

static void
State_dealloc(StateObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    State_clear(self);
    tp->tp_free((PyObject *)self); /* a Python subclass's dealloc drops its type itself */
}

static PyMemberDef State_members[] = {
    {"lock", T_OBJECT_EX, offsetof(StateObject, lock), READONLY, NULL},
    {"requests", T_PYSSIZET, offsetof(StateObject, requests), 0, NULL},
    {"rows", T_PYSSIZET, offsetof(StateObject, rows), 0, NULL},
    {"rejected", T_PYSSIZET, offsetof(StateObject, rejected), 0, NULL},
    {"errors", T_PYSSIZET, offsetof(StateObject, errors), 0, NULL},
    {"in_flight", T_PYSSIZET, offsetof(StateObject, in_flight), 0, NULL},
    {"retiring", T_BOOL, offsetof(StateObject, retiring), 0, NULL},
    {"latency", T_OBJECT_EX, offsetof(StateObject, latency), 0, NULL},
    {"drift", T_OBJECT, offsetof(StateObject, drift), 0, NULL},
    {NULL},
};

static PyTypeObject StateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.ModelState",
    .tp_doc = "ModelState(lock, latency, drift): one loaded model's counters (see "
              "agent.inference.ModelState).",
    .tp_basicsize = sizeof(StateObject),
    .tp_dictoffset = offsetof(StateObject, dict),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)State_init,
    .tp_traverse = (traverseproc)State_traverse,
    .tp_clear = (inquiry)State_clear,
    .tp_dealloc = (destructor)State_dealloc,
    .tp_members = State_members,
};

/* --- Predictor ---------------------------------------------------------------------------- */

/* InferenceService.predict for the common request; everything else goes to ``slow`` (the
 * service's Python predict) with the same arguments, before anything was counted. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *slow;         /* the Python predict: takes every call this one does not */
    PyObject *result_type;  /* InferenceResult, a tuple subclass of 4 */
    PyObject *input_error;  /* InputError: counted as rejected, anything else as an error */
    Py_ssize_t max_rows;
    int reject_nan;
    /* the active model, as set_model() unpacked it (model NULL: none or no fast state) */
    PyObject *model;
    StateObject *state;
    PyObject *run;
    PyObject *labels; /* (name, version, class_names) */
    Py_ssize_t n_features;
    Py_ssize_t delegated; /* calls handed to ``slow`` (tests check the fast path is taken) */
} PredictorObject;

static PyTypeObject PredictorType;

static inline int
all_finite(const char *data, Py_ssize_t n)
{
    /* NaN and the infinities are the float32 values whose exponent bits are all set; one
     * branch-free pass the compiler vectorises */
    uint32_t bad = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, data + 4 * i, 4); /* no aliasing assumption; compiles to a load */
        bad |= (uint32_t)((bits & 0x7f800000u) == 0x7f800000u);
    }
    return !bad;
}

static PyObject *
predictor_delegate(PredictorObject *self, PyObject *const *args, size_t nargsf,
                   PyObject *kwnames)
{
    self->delegated += 1;
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

static PyObject *
Predictor_vectorcall(PredictorObject *self, PyObject *const *args, size_t nargsf,
                     PyObject *kwnames)
{
    double start = now_seconds();
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    /* predict(batch) or predict(batch, owned) / predict(batch, owned=...): ``owned`` changes
     * nothing on either path (the drift feed copies every batch) */
    int args_ok = nargs == 2 ? kwnames == NULL
                             : nargs == 1 && (kwnames == NULL ||
                                              (PyTuple_GET_SIZE(kwnames) == 1 &&
                                               PyUnicode_CompareWithASCIIString(
                                                   PyTuple_GET_ITEM(kwnames, 0), "owned") == 0));
    if (!args_ok || self->model == NULL) {
        return predictor_delegate(self, args, nargsf, kwnames);
    }
    PyObject *batch = args[0];
    if (!is_plain_f32_2d(batch)) {
        return predictor_delegate(self, args, nargsf, kwnames);
    }
    Py_ssize_t rows = ARR(batch)->dimensions[0];
    if (ARR(batch)->dimensions[1] != self->n_features || rows < 1 || rows > self->max_rows ||
        (self->reject_nan &&
         !all_finite(ARR(batch)->data, rows * self->n_features))) {
        return predictor_delegate(self, args, nargsf, kwnames);
    }
    /* the model's references, held for the call: a swap may replace them meanwhile */
    StateObject *st = (StateObject *)Py_NewRef(self->state);
    PyObject *run = Py_NewRef(self->run);
    PyObject *labels = Py_NewRef(self->labels);
    LockObject *lock = (LockObject *)st->lock;
    PyObject *outputs = NULL, *result = NULL;

    if (lock_take(lock) < 0) {
        goto done;
    }
    if (st->retiring) { /* swapped out a moment ago: the Python path finds the new model */
        lock_give(lock);
        result = predictor_delegate(self, args, nargsf, kwnames);
        goto done;
    }
    st->in_flight += 1;
    lock_give(lock);

    outputs = PyObject_Vectorcall(run, &batch, 1, NULL);
    if (outputs == NULL) {
        /* counted under the lock, as the Python path does; the exception stays set */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        int taken = lock_take(lock);
        if (PyErr_GivenExceptionMatches(type, self->input_error)) {
            st->rejected += 1;
        }
        else {
            st->errors += 1;
        }
        st->in_flight -= 1;
        if (taken == 0) {
            lock_give(lock);
            PyErr_Restore(type, value, tb);
        }
        else {
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
        }
        goto done;
    }
    if (lock_take(lock) < 0) {
        goto done;
    }
    st->requests += 1;
    st->rows += rows;
    st->in_flight -= 1;
    PyObject *drift = st->drift;
    if (drift != NULL && drift != Py_None) {
        Py_INCREF(drift); /* held while its flush may run Python code */
        int copied = 0;
        if (PyObject_TypeCheck(drift, &BlockType)) {
            copied = block_add_fast((BlockObject *)drift, batch, outputs);
        }
        if (copied == 0) {
            PyObject *r = PyObject_CallMethodObjArgs(drift, str_add, batch, outputs, NULL);
            copied = r == NULL ? -1 : 1;
            Py_XDECREF(r);
        }
        Py_DECREF(drift);
        if (copied < 0) {
            lock_give(lock);
            goto done;
        }
    }
    double seconds = now_seconds() - start;
    PyObject *latency = Py_NewRef(st->latency); /* held while a wrap runs _fold */
    int recorded;
    if (PyObject_TypeCheck(latency, &RingType)) {
        recorded = ring_record((RingObject *)latency, seconds);
    }
    else {
        PyObject *r = PyObject_CallMethod(latency, "record", "d", seconds);
        recorded = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    }
    Py_DECREF(latency);
    lock_give(lock);
    if (recorded < 0) {
        goto done;
    }
    /* tuple.__new__(InferenceResult, (outputs, *labels)), without the call */
    result = ((PyTypeObject *)self->result_type)->tp_alloc((PyTypeObject *)self->result_type, 4);
    if (result == NULL) {
        goto done;
    }
    PyTuple_SET_ITEM(result, 0, Py_NewRef(outputs));
    for (Py_ssize_t i = 0; i < 3; i++) {
        PyTuple_SET_ITEM(result, i + 1, Py_NewRef(PyTuple_GET_ITEM(labels, i)));
    }
done:
    Py_XDECREF(outputs);
    Py_DECREF(st);
    Py_DECREF(run);
    Py_DECREF(labels);
    return result;
}

static int
Predictor_init(PredictorObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"slow", "result_type", "input_error", "max_rows", "reject_nan",
                             NULL};
    PyObject *slow, *result_type, *input_error;
    Py_ssize_t max_rows;
    int reject_nan;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!Onp:Predictor", kwlist, &slow,
                                     &PyType_Type, &result_type, &input_error, &max_rows,
                                     &reject_nan)) {
        return -1;
    }
    if (!PyType_IsSubtype((PyTypeObject *)result_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "result_type must be a tuple subclass");
        return -1;
    }
    Py_XSETREF(self->slow, Py_NewRef(slow));
    Py_XSETREF(self->result_type, Py_NewRef(result_type));
    Py_XSETREF(self->input_error, Py_NewRef(input_error));
    self->max_rows = max_rows;
    self->reject_nan = reject_nan;
    self->vectorcall = (vectorcallfunc)Predictor_vectorcall;
    return 0;
}

static PyObject *
Predictor_set_model(PredictorObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    /* set_model(model, state, run, labels, n_features) or set_model(None) */
    if (nargs == 1 && args[0] == Py_None) {
        Py_CLEAR(self->model);
        Py_CLEAR(self->state);
        Py_CLEAR(self->run);
        Py_CLEAR(self->labels);
        Py_RETURN_NONE;
    }
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "set_model(model, state, run, labels, n_features) or set_model(None)");
        return NULL;
    }
    if (!PyTuple_CheckExact(args[3]) || PyTuple_GET_SIZE(args[3]) != 3) {
        PyErr_SetString(PyExc_TypeError, "labels must be a tuple of 3");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(args[4]);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyObject_TypeCheck(args[1], &StateType)) { /* a Python state: every call goes slow */
        return Predictor_set_model(self, (PyObject *const[]){Py_None}, 1);
    }
    Py_XSETREF(self->model, Py_NewRef(args[0]));
    Py_XSETREF(self->state, (StateObject *)Py_NewRef(args[1]));
    Py_XSETREF(self->run, Py_NewRef(args[2]));
    Py_XSETREF(self->labels, Py_NewRef(args[3]));
    self->n_features = n;
    Py_RETURN_NONE;
}

static int
Predictor_traverse(PredictorObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->slow);
    Py_VISIT(self->result_type);
    Py_VISIT(self->input_error);
    Py_VISIT(self->model);
    Py_VISIT(self->state);
    Py_VISIT(self->run);
    Py_VISIT(self->labels);
    return 0;
}

static int
Predictor_clear(PredictorObject *self)
{
    Py_CLEAR(self->slow);
    Py_CLEAR(self->result_type);
    Py_CLEAR(self->input_error);
    Py_CLEAR(self->model);
    Py_CLEAR(self->state);
    Py_CLEAR(self->run);
    Py_CLEAR(self->labels);
    return 0;
}

static void
Predictor_dealloc(PredictorObject *self)
{
    PyObject_GC_UnTrack(self);
    Predictor_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Predictor_methods[] = {
    {"set_model", (PyCFunction)(void (*)(void))Predictor_set_model, METH_FASTCALL,
     "set_model(model, state, run, labels, n_features) | set_model(None)"},
    {NULL},
};

static PyMemberDef Predictor_members[] = {
    {"delegated", T_PYSSIZET, offsetof(PredictorObject, delegated), READONLY,
     "calls handed to the Python predict"},
    {"model", T_OBJECT, offsetof(PredictorObject, model), READONLY, NULL},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(PredictorObject, vectorcall), READONLY},
    {NULL},
};

static PyTypeObject PredictorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.Predictor",
    .tp_doc = "Predictor(slow, result_type, input_error, max_rows, reject_nan): the service's "
              "predict for the common request, the rest handed to slow.",
    .tp_basicsize = sizeof(PredictorObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Predictor_init,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(PredictorObject, vectorcall),
    .tp_traverse = (traverseproc)Predictor_traverse,
    .tp_clear = (inquiry)Predictor_clear,
    .tp_dealloc = (destructor)Predictor_dealloc,
    .tp_methods = Predictor_methods,
    .tp_members = Predictor_members,
};

/* --- LiteRtRunner ------------------------------------------------------------------------- */

/* LiteRtRuntime.run for a batch of the size the interpreter is allocated for: under the
 * runtime's lock, the interpreter wrapper's SetTensor, Invoke and GetTensor (the Python methods
 * agent/runtimes.py calls). Other sizes and a closed runtime go to ``slow`` (the Python run);
 * a failure goes to the runtime's _run_failed(exc), which raises the runtime's error. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *runtime;
    PyObject *slow;
    PyObject *lock; /* the runtime's Lock */
    PyObject *input_index;
    PyObject *output_index;
    Py_ssize_t delegated;
} RunnerObject;

static PyTypeObject RunnerType;
static PyObject *str_interpreter, *str_allocated_rows, *str_set_tensor, *str_invoke,
    *str_get_tensor, *str_run_failed;

static PyObject *
Runner_vectorcall(RunnerObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || kwnames != NULL || Py_TYPE(args[0]) != ndarray_type ||
        ARR(args[0])->nd != 2) {
        self->delegated += 1;
        return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
    }
    PyObject *batch = args[0];
    PyObject *runtime = self->runtime;
    PyObject *lock = Py_NewRef(self->lock);
    if (lock_take((LockObject *)lock) < 0) {
        Py_DECREF(lock);
        return NULL;
    }
    PyObject *out = NULL, *raw = NULL, *interpreter = NULL;
    PyObject *allocated = PyObject_GetAttr(runtime, str_allocated_rows);
    if (allocated == NULL) {
        goto unlock;
    }
    Py_ssize_t rows = PyLong_AsSsize_t(allocated);
    Py_DECREF(allocated);
    if (rows == -1 && PyErr_Occurred()) {
        goto unlock;
    }
    interpreter = PyObject_GetAttr(runtime, str_interpreter);
    if (interpreter == NULL) {
        goto unlock;
    }
    if (rows != ARR(batch)->dimensions[0] || interpreter == Py_None) {
        /* a resize or a closed runtime: the Python run says or does what is needed */
        lock_give((LockObject *)lock);
        Py_DECREF(lock);
        Py_DECREF(interpreter);
        self->delegated += 1;
        return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
    }
    /* The wrapper is fetched per call and no reference to it outlives the call: LiteRT's
     * Python methods check its reference count before they let anyone invoke or resize. */
    raw = PyObject_GetAttr(interpreter, str_interpreter);
    if (raw != NULL) {
        PyObject *set_args[3] = {raw, self->input_index, batch};
        PyObject *r = PyObject_VectorcallMethod(str_set_tensor, set_args,
                                                3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (r != NULL) {
            Py_DECREF(r);
            r = PyObject_VectorcallMethod(str_invoke, &raw, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                          NULL);
        }
        if (r != NULL) {
            Py_DECREF(r);
            PyObject *get_args[2] = {raw, self->output_index};
            out = PyObject_VectorcallMethod(str_get_tensor, get_args,
                                            2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        }
        Py_CLEAR(raw);
    }
    if (out == NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
        /* as the Python run: the runtime's error, raised from the runtime library's */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL) {
            PyException_SetTraceback(value, tb);
        }
        PyObject *r = PyObject_CallMethodOneArg(runtime, str_run_failed, value);
        Py_XDECREF(r); /* it raises; a return would be a bug, reported as is */
        if (r != NULL) {
            PyErr_SetString(PyExc_SystemError, "_run_failed returned instead of raising");
        }
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
unlock:
    Py_XDECREF(interpreter);
    lock_give((LockObject *)lock);
    Py_DECREF(lock);
    return out;
}

static int
Runner_init(RunnerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"runtime", "slow", "lock", "input_index", "output_index", NULL};
    PyObject *runtime, *slow, *lock, *in_index, *out_index;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!O!O!:LiteRtRunner", kwlist, &runtime,
                                     &slow, &LockType, &lock, &PyLong_Type, &in_index,
                                     &PyLong_Type, &out_index)) {
        return -1;
    }
    Py_XSETREF(self->runtime, Py_NewRef(runtime));
    Py_XSETREF(self->slow, Py_NewRef(slow));
    Py_XSETREF(self->lock, Py_NewRef(lock));
    Py_XSETREF(self->input_index, Py_NewRef(in_index));
    Py_XSETREF(self->output_index, Py_NewRef(out_index));
    self->vectorcall = (vectorcallfunc)Runner_vectorcall;
    return 0;
}

static int
Runner_traverse(RunnerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->runtime);
    Py_VISIT(self->slow);
    return 0;
}

static int
Runner_clear(RunnerObject *self)
{
    Py_CLEAR(self->runtime);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->input_index);
    Py_CLEAR(self->output_index);
    return 0;
}

static void
Runner_dealloc(RunnerObject *self)
{
    PyObject_GC_UnTrack(self);
    Runner_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Runner_members[] = {
    {"delegated", T_PYSSIZET, offsetof(RunnerObject, delegated), READONLY,
     "calls handed to the Python run"},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(RunnerObject, vectorcall), READONLY},
    {NULL},
};

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent._fastpath.LiteRtRunner",
    .tp_doc = "LiteRtRunner(runtime, slow, lock, input_index, output_index): LiteRtRuntime.run at "
              "the allocated batch size, the rest handed to slow.",
    .tp_basicsize = sizeof(RunnerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Runner_init,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(RunnerObject, vectorcall),
    .tp_traverse = (traverseproc)Runner_traverse,
    .tp_clear = (inquiry)Runner_clear,
    .tp_dealloc = (destructor)Runner_dealloc,
    .tp_members = Runner_members,
};


/* --- drift binning -------------------------------------------------------------------------- */

static int
get_buffer(PyObject *obj, Py_buffer *view, const char *what, const char *format, int ndim,
           int writable)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        return -1;
    }
    /* numpy says "l" or "q" for int64 depending on the platform: compare the item size */
    int ok = view->ndim == ndim && view->format != NULL &&
             (strcmp(format, "f") == 0 ? strcmp(view->format, "f") == 0 && view->itemsize == 4
                                       : view->itemsize == 8 && strchr("lq", view->format[0]) &&
                                             view->format[1] == '\0');
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "bin_counts: %s must be a C-contiguous %d-D %s array",
                     what, ndim, strcmp(format, "f") == 0 ? "float32" : "int64");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* bin_counts(xt, rows, edges, last, offsets, missing, counts): agent.drift's binning of one
 * block, the same integers as its numpy passes: for feature j and each of the first ``rows``
 * values x of xt[j] (float32, features x block), slot = offsets[j] + (number of edges[:, j]
 * that x reaches) - (x == last[j]), or missing[j] where x is NaN or infinite; counts[slot] += 1.
 * Edge ranks padded with +inf are skipped: only an infinite x reaches them, and that goes to
 * missing anyway. The edges of a feature must be ascending (agent.drift checks). */
static PyObject *
bin_counts(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "bin_counts(xt, rows, edges, last, offsets, missing, counts)");
        return NULL;
    }
    Py_ssize_t rows = PyLong_AsSsize_t(args[1]);
    if (rows == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_buffer xt, edges, last, offsets, missing, counts;
    Py_buffer *views[] = {&xt, &edges, &last, &offsets, &missing, &counts};
    int got = 0;
    PyObject *result = NULL;
    if (get_buffer(args[0], &xt, "xt", "f", 2, 0) < 0) goto out;
    got++;
    if (get_buffer(args[2], &edges, "edges", "f", 2, 0) < 0) goto out;
    got++;
    if (get_buffer(args[3], &last, "last", "f", 1, 0) < 0) goto out;
    got++;
    if (get_buffer(args[4], &offsets, "offsets", "q", 1, 0) < 0) goto out;
    got++;
    if (get_buffer(args[5], &missing, "missing", "q", 1, 0) < 0) goto out;
    got++;
    if (get_buffer(args[6], &counts, "counts", "q", 1, 1) < 0) goto out;
    got++;
    Py_ssize_t f = xt.shape[0], width = xt.shape[1], k = edges.shape[0];
    Py_ssize_t n_slots = counts.shape[0];
    if (rows < 0 || rows > width || edges.shape[1] != f || last.shape[0] != f ||
        offsets.shape[0] != f || missing.shape[0] != f) {
        PyErr_SetString(PyExc_ValueError, "bin_counts: arrays of mismatched shapes");
        goto out;
    }
    const float *x = (const float *)xt.buf;
    const float *e = (const float *)edges.buf;
    const float *l = (const float *)last.buf;
    const int64_t *off = (const int64_t *)offsets.buf;
    const int64_t *miss = (const int64_t *)missing.buf;
    int64_t *c = (int64_t *)counts.buf;
    if (k > 255) {
        PyErr_SetString(PyExc_ValueError, "bin_counts: more than 255 edges a feature");
        goto out;
    }
    for (Py_ssize_t j = 0; j < f; j++) {
        Py_ssize_t reachable = 0; /* the highest slot a finite value reaches is off + this */
        for (Py_ssize_t r = 0; r < k; r++) {
            reachable += !(isinf(e[r * f + j]) && e[r * f + j] > 0);
        }
        if (off[j] < 0 || miss[j] < 0 || miss[j] >= n_slots || off[j] + reachable >= n_slots) {
            PyErr_SetString(PyExc_ValueError, "bin_counts: a slot outside counts");
            goto out;
        }
    }
    if (rows > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "bin_counts: too many rows");
        goto out;
    }
    for (Py_ssize_t j = 0; j < f; j++) {
        const float *v = x + j * width;
        const float lastj = l[j];
        float edge_j[256];
        Py_ssize_t kj = 0; /* this feature's edges, the +inf padding left out */
        for (Py_ssize_t r = 0; r < k; r++) {
            float edge = e[r * f + j];
            if (!(isinf(edge) && edge > 0)) {
                if (kj > 0 && !(edge >= edge_j[kj - 1])) {
                    PyErr_SetString(PyExc_ValueError, "bin_counts: edges must be ascending");
                    goto out;
                }
                edge_j[kj++] = edge;
            }
        }
        /* the values that are not finite, and the finite ones equal to the last edge */
        int32_t nan = 0, pos_inf = 0, neg_inf = 0, at_last = 0;
        for (Py_ssize_t i = 0; i < rows; i++) {
            nan += v[i] != v[i];
            pos_inf += v[i] == INFINITY;
            neg_inf += v[i] == -INFINITY;
            at_last += v[i] == lastj; /* never for a NaN lastj (no representable last edge) */
        }
        if (!isfinite(lastj)) {
            at_last = 0;
        }
        int64_t finite = rows - nan - pos_inf - neg_inf;
        /* how many finite values reach each edge: with ascending edges a value's rank is b
         * exactly when it reaches edge b-1 and not edge b, so a bin's count is the difference
         * of two neighbouring reach counts; one vectorised pass per edge, no scatter */
        int64_t below = finite; /* finite values reaching the previous edge (all, for bin 0) */
        for (Py_ssize_t r = 0; r < kj; r++) {
            const float edge = edge_j[r];
            int32_t reach = 0;
            for (Py_ssize_t i = 0; i < rows; i++) {
                reach += v[i] >= edge;
            }
            int64_t reach_finite = (int64_t)reach - pos_inf - (edge == -INFINITY ? neg_inf : 0);
            c[off[j] + r] += below - reach_finite;
            below = reach_finite;
        }
        c[off[j] + kj] += below - at_last; /* a value on the last edge is in the last inner bin */
        if (kj > 0) {
            c[off[j] + kj - 1] += at_last;
        }
        c[miss[j]] += nan + pos_inf + neg_inf;
    }
    result = Py_NewRef(Py_None);
out:
    for (int i = 0; i < got; i++) {
        PyBuffer_Release(views[i]);
    }
    return result;
}

/* --- module ------------------------------------------------------------------------------- */

static PyObject *
layout(PyObject *Py_UNUSED(module), PyObject *arr)
{
    /* what this file reads from an ndarray, for agent.fastpath to compare with numpy's view */
    ArrayFields *a = ARR(arr);
    PyObject *dims = PyTuple_New(a->nd), *strides = PyTuple_New(a->nd);
    if (dims == NULL || strides == NULL) {
        Py_XDECREF(dims);
        Py_XDECREF(strides);
        return NULL;
    }
    for (int i = 0; i < a->nd; i++) {
        PyTuple_SET_ITEM(dims, i, PyLong_FromSsize_t(a->dimensions[i]));
        PyTuple_SET_ITEM(strides, i, PyLong_FromSsize_t(a->strides[i]));
    }
    return Py_BuildValue("(nNNOi)", (Py_ssize_t)a->data, dims, strides, a->descr, a->flags);
}

static PyObject *
configure(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *nd_type, *f32;
    if (!PyArg_ParseTuple(args, "O!O:configure", &PyType_Type, &nd_type, &f32)) {
        return NULL;
    }
    Py_XSETREF(ndarray_type, (PyTypeObject *)Py_NewRef(nd_type));
    Py_XSETREF(float32_descr, Py_NewRef(f32));
    Py_RETURN_NONE;
}

static PyObject *
all_finite_py(PyObject *Py_UNUSED(module), PyObject *arr)
{
    if (ndarray_type == NULL || !is_plain_f32_2d(arr)) {
        PyErr_SetString(PyExc_TypeError, "a C-contiguous float32 2-D ndarray");
        return NULL;
    }
    return PyBool_FromLong(all_finite(ARR(arr)->data,
                                      ARR(arr)->dimensions[0] * ARR(arr)->dimensions[1]));
}

static PyMethodDef module_methods[] = {
    {"layout", layout, METH_O, "layout(ndarray) -> (data, shape, strides, dtype, flags)"},
    {"configure", configure, METH_VARARGS, "configure(numpy.ndarray, numpy.dtype('float32'))"},
    {"all_finite", all_finite_py, METH_O, "all_finite(float32 2-D array) -> bool"},
    {"bin_counts", (PyCFunction)(void (*)(void))bin_counts, METH_FASTCALL,
     "bin_counts(xt, rows, edges, last, offsets, missing, counts): add a block's bin counts"},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent._fastpath",
    .m_doc = "The inference service's per-call hot path in C (see agent.fastpath).",
    .m_size = -1,
    .m_methods = module_methods,
};

#define INTERN(var, text)                                                                    \
    do {                                                                                     \
        var = PyUnicode_InternFromString(text);                                              \
        if (var == NULL) {                                                                   \
            return NULL;                                                                     \
        }                                                                                    \
    } while (0)

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    INTERN(str_fold, "_fold");
    INTERN(str_flush, "flush");
    INTERN(str_add, "add");
    INTERN(str_interpreter, "_interpreter");
    INTERN(str_allocated_rows, "_allocated_rows");
    INTERN(str_set_tensor, "SetTensor");
    INTERN(str_invoke, "Invoke");
    INTERN(str_get_tensor, "GetTensor");
    INTERN(str_run_failed, "_run_failed");
    PyTypeObject *types[] = {&LockType, &RingType, &BlockType, &StateType, &PredictorType,
                             &RunnerType};
    const char *names[] = {"Lock", "LatencyRing", "RowBlock", "ModelState", "Predictor",
                           "LiteRtRunner"};
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) {
        return NULL;
    }
    /* agent.fastpath refuses a build of another interface version (a stale in-place build) */
    if (PyModule_AddIntConstant(m, "INTERFACE", FASTPATH_INTERFACE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
        if (PyType_Ready(types[i]) < 0 ||
            PyModule_AddObjectRef(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
