/* The relay's compiled core: splice.py's state machine, moved below the interpreter.
 *
 * Why: at thousands of short sessions a second, the Python relay's readiness callbacks
 * (four or five per SMTP session: greeting, command, reply, two EOFs) were the largest share
 * of the Python work per session left after the hand-off.  The rules are splice.py's, one
 * for one (that module's docstring is the contract and stays the reference and the
 * fallback): per direction, small exchanges copied with recv/send, a kernel pipe and
 * splice() from the first full read or blocked send on; half-close (an EOF is passed on as
 * shutdown(SHUT_WR) once the direction is drained); flow control (a direction stops reading
 * while its destination is full); every byte read is delivered or the other side is reset;
 * on_done(pair, outcome) exactly once.
 *
 * One Relay per event loop owns an epoll set whose fd the loop polls; poll() handles every
 * ready event in C and calls back into Python only when a pair ends.  A Pair owns its two
 * fds (the sockets were detached) and closes them.  Everything runs in the loop's thread
 * with the GIL held; every syscall here is non-blocking.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define COPY_MAX 16384
#define CHUNK (1 << 20)
#define PIPE_SIZE (1 << 20)
#define BATCH 512
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
#define EV_IN (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)
#define EV_OUT (EPOLLOUT | EPOLLERR | EPOLLHUP)

typedef struct {
    int src, dst;
    int pipe_r, pipe_w;
    Py_ssize_t queued;      /* bytes sitting in the pipe */
    char *held;             /* copy-mode remainder when no pipe could be had */
    Py_ssize_t held_off, held_len;
    long long nbytes;
    unsigned char eof, shut, reading, writing;
} Dir;

struct Pair;

typedef struct {
    struct Pair *pair;
    int idx;                /* 0: the client's fd, 1: the backend's */
    uint32_t mask;          /* what the kernel has registered (0: not in the set) */
} Slot;

typedef struct Relay {
    PyObject_HEAD
    int ep;
    int in_poll;
    PyObject *grave;        /* pairs ended: their reference is dropped after the batch */
    PyObject *err_type, *err_value, *err_tb;  /* the first on_done exception of a batch */
    char buf[COPY_MAX];
} Relay;

typedef struct Pair {
    PyObject_HEAD
    Relay *relay;
    Dir d[2];               /* d[0]: client -> backend (up), d[1]: backend -> client */
    Slot s[2];
    int fd[2];
    int done, held_ref;
    double started;
    PyObject *on_done, *tag, *outcome;
} Pair;

static PyTypeObject RelayType, PairType;
static PyObject *str_spliced, *str_error;

/* --- epoll registration --------------------------------------------------------------- */

static int slot_sync(Pair *p, int i) {
    Slot *s = &p->s[i];
    uint32_t mask = (p->d[i].reading ? (EPOLLIN | EPOLLRDHUP) : 0) |
                    (p->d[1 - i].writing ? EPOLLOUT : 0);
    if (mask == s->mask)
        return 0;
    struct epoll_event ev;
    ev.events = mask;
    ev.data.ptr = s;
    int op = !mask ? EPOLL_CTL_DEL : (s->mask ? EPOLL_CTL_MOD : EPOLL_CTL_ADD);
    if (epoll_ctl(p->relay->ep, op, p->fd[i], &ev) < 0 && op != EPOLL_CTL_DEL)
        return -1;
    s->mask = mask;
    return 0;
}

static int pair_fail(Pair *p);

/* the fd read by d is slot (d - p->d); the fd d writes is the other slot */
static int want_read(Pair *p, Dir *d, int on) {
    if (d->reading == on)
        return 0;
    d->reading = (unsigned char)on;
    if (slot_sync(p, (int)(d - p->d)) < 0)
        return pair_fail(p);
    return 0;
}

static int want_write(Pair *p, Dir *d, int on) {
    if (d->writing == on)
        return 0;
    d->writing = (unsigned char)on;
    if (slot_sync(p, 1 - (int)(d - p->d)) < 0)
        return pair_fail(p);
    return 0;
}

/* --- ending a pair -------------------------------------------------------------------- */

static void relay_bury(Relay *r, Pair *p) {
    /* the relay's reference to an ended pair outlives the current batch: later events of
     * the batch may still point at its slots */
    if (!p->held_ref)
        return;
    p->held_ref = 0;
    if (r->grave != NULL && PyList_Append(r->grave, (PyObject *)p) == 0) {
        Py_DECREF(p);
        if (!r->in_poll)
            PyList_SetSlice(r->grave, 0, PY_SSIZE_T_MAX, NULL);
        return;
    }
    PyErr_Clear();
    Py_DECREF(p);  /* no list: the caller still holds a reference of its own */
}

/* returns -1: the pair is closed (the caller must not touch it further) */
static int pair_close(Pair *p, int cut) {
    if (p->done)
        return -1;
    p->done = 1;
    for (int i = 0; i < 2; i++) {
        if (p->fd[i] >= 0) {
            if (cut) {
                struct linger lg = {1, 0};  /* close() sends a RST */
                setsockopt(p->fd[i], SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            }
            close(p->fd[i]);  /* also takes it out of the epoll set */
            p->fd[i] = -1;
        }
        p->s[i].mask = 0;
        Dir *d = &p->d[i];
        if (d->pipe_r >= 0) close(d->pipe_r);
        if (d->pipe_w >= 0) close(d->pipe_w);
        d->pipe_r = d->pipe_w = -1;
        PyMem_Free(d->held);
        d->held = NULL;
        d->reading = d->writing = 0;
    }
    Relay *r = p->relay;
    PyObject *cb = p->on_done;
    p->on_done = NULL;  /* exactly once, and no cycle through the owner */
    if (cb != NULL) {
        Py_INCREF(p);
        PyObject *res = PyObject_CallFunctionObjArgs(cb, (PyObject *)p, p->outcome, NULL);
        if (res == NULL) {
            if (r->in_poll && r->err_type == NULL)
                PyErr_Fetch(&r->err_type, &r->err_value, &r->err_tb);
            else if (r->in_poll)
                PyErr_WriteUnraisable(cb);
            /* outside poll (abort): the exception stays set for the caller */
        }
        Py_XDECREF(res);
        Py_DECREF(cb);
        relay_bury(r, p);
        Py_DECREF(p);
    } else {
        relay_bury(r, p);
    }
    return -1;
}

static int pair_fail(Pair *p) {
    if (p->outcome == str_spliced) {
        Py_INCREF(str_error);
        Py_SETREF(p->outcome, str_error);
    }
    return pair_close(p, 1);
}

static int check_done(Pair *p) {
    if (p->d[0].shut && p->d[1].shut)
        return pair_close(p, 0);
    return 0;
}

/* --- one direction -------------------------------------------------------------------- */

static int make_pipe(Dir *d) {
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
        return -1;
    d->pipe_r = fds[0];
    d->pipe_w = fds[1];
    (void)fcntl(d->pipe_w, F_SETPIPE_SZ, PIPE_SIZE);  /* over the budget: 64 KiB works */
    return 0;
}

static int finish_if_drained(Pair *p, Dir *d) {
    if (d->eof && !d->queued && d->held == NULL && !d->shut) {
        d->shut = 1;
        (void)shutdown(d->dst, SHUT_WR);  /* half-close: pass the EOF on */
        return check_done(p);
    }
    return 0;
}

static int at_eof(Pair *p, Dir *d) {
    Dir *peer = &p->d[1 - (int)(d - p->d)];
    d->eof = 1;
    if (peer->shut && !d->queued && d->held == NULL) {
        /* the last direction, all passed on: closing both sends our FIN */
        d->shut = 1;
        return check_done(p);
    }
    if (want_read(p, d, 0) < 0)
        return -1;
    return finish_if_drained(p, d);
}

static int flush(Pair *p, Dir *d) {
    while (d->queued) {
        ssize_t m = splice(d->pipe_r, NULL, d->dst, NULL, (size_t)d->queued, SPLICE_FLAGS);
        if (m < 0) {
            if (errno == EAGAIN || errno == EINTR)
                break;
            return pair_fail(p);
        }
        if (m == 0)
            break;
        d->queued -= m;
    }
    if (d->queued) {  /* the destination is full: stop reading until it drains */
        if (want_read(p, d, 0) < 0 || want_write(p, d, 1) < 0)
            return -1;
        return 0;
    }
    if (want_write(p, d, 0) < 0)
        return -1;
    if (!d->eof)
        return want_read(p, d, 1);
    return finish_if_drained(p, d);
}

static int hold(Dir *d, const char *data, Py_ssize_t n) {
    d->held = PyMem_Malloc((size_t)n);
    if (d->held == NULL)
        return -1;
    memcpy(d->held, data, (size_t)n);
    d->held_off = 0;
    d->held_len = n;
    return 0;
}

static int send_held(Pair *p, Dir *d) {
    ssize_t n = send(d->dst, d->held + d->held_off, (size_t)(d->held_len - d->held_off),
                     MSG_NOSIGNAL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        return pair_fail(p);
    }
    d->held_off += n;
    if (d->held_off < d->held_len)
        return 0;
    PyMem_Free(d->held);
    d->held = NULL;
    if (want_write(p, d, 0) < 0)
        return -1;
    if (!d->eof)
        return want_read(p, d, 1);
    return finish_if_drained(p, d);
}

static int copy(Pair *p, Dir *d) {
    char *buf = p->relay->buf;
    ssize_t n = recv(d->src, buf, COPY_MAX, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        return pair_fail(p);
    }
    if (n == 0)
        return at_eof(p, d);
    d->nbytes += n;
    ssize_t sent = send(d->dst, buf, (size_t)n, MSG_NOSIGNAL);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EINTR)
            return pair_fail(p);
        sent = 0;
    }
    if (sent == n && n < COPY_MAX)
        return 0;
    if (make_pipe(d) == 0) {
        if (sent < n) {  /* park the rest in the (empty, >= 64 KiB) pipe */
            ssize_t w = write(d->pipe_w, buf + sent, (size_t)(n - sent));
            if (w != n - sent)
                return pair_fail(p);
            d->queued += w;
            return flush(p, d);
        }
        return 0;
    }
    if (sent < n) {  /* no pipe: hold the rest ourselves until the destination drains */
        if (hold(d, buf + sent, n - sent) < 0)
            return pair_fail(p);
        if (want_read(p, d, 0) < 0 || want_write(p, d, 1) < 0)
            return -1;
    }
    return 0;
}

static int on_readable(Pair *p, Dir *d) {
    if (d->pipe_w < 0)
        return copy(p, d);
    ssize_t n = splice(d->src, NULL, d->pipe_w, NULL, CHUNK, SPLICE_FLAGS);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return 0;
        return pair_fail(p);
    }
    if (n == 0)
        return at_eof(p, d);
    d->nbytes += n;
    d->queued += n;
    return flush(p, d);
}

static int on_writable(Pair *p, Dir *d) {
    if (d->held != NULL)
        return send_held(p, d);
    return flush(p, d);
}

/* --- Pair ----------------------------------------------------------------------------- */

static void Pair_dealloc(Pair *p) {
    for (int i = 0; i < 2; i++) {  /* never started, or the relay is gone: just close */
        if (p->fd[i] >= 0)
            close(p->fd[i]);
        if (p->d[i].pipe_r >= 0) close(p->d[i].pipe_r);
        if (p->d[i].pipe_w >= 0) close(p->d[i].pipe_w);
        PyMem_Free(p->d[i].held);
    }
    Py_XDECREF(p->relay);
    Py_XDECREF(p->on_done);
    Py_XDECREF(p->tag);
    Py_XDECREF(p->outcome);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

PyDoc_STRVAR(Pair_start_doc,
"start(greeting=b'') -- relay from now on; `greeting`: bytes already read from the "
"backend, for the client first");

static PyObject *Pair_start(Pair *p, PyObject *args) {
    Py_buffer g = {0};
    if (!PyArg_ParseTuple(args, "|y*:start", &g))
        return NULL;
    if (p->done || p->held_ref) {
        PyBuffer_Release(&g);
        PyErr_SetString(PyExc_RuntimeError, "pair already started");
        return NULL;
    }
    Py_INCREF(p);  /* the relay's reference while it runs */
    p->held_ref = 1;
    Dir *up = &p->d[0], *down = &p->d[1];
    if (want_read(p, up, 1) < 0)
        goto out;
    if (g.len > 0) {
        down->nbytes += g.len;
        ssize_t sent = send(down->dst, g.buf, (size_t)g.len, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                pair_fail(p);
                goto out;
            }
            sent = 0;
        }
        if (sent == g.len) {
            want_read(p, down, 1);
        } else if (hold(down, (const char *)g.buf + sent, g.len - sent) < 0) {
            pair_fail(p);
        } else {
            want_write(p, down, 1);  /* not read until the rest is out */
        }
    } else {
        want_read(p, down, 1);
    }
out:
    PyBuffer_Release(&g);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Pair_abort_doc,
"abort(outcome) -- reset both sides now; on_done(pair, outcome) is called before this "
"returns");

static PyObject *Pair_abort(Pair *p, PyObject *outcome) {
    if (!p->done) {
        Py_INCREF(outcome);
        Py_SETREF(p->outcome, outcome);
        pair_close(p, 1);
        if (PyErr_Occurred())
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Pair_get_up(Pair *p, void *c) { return PyLong_FromLongLong(p->d[0].nbytes); }
static PyObject *Pair_get_down(Pair *p, void *c) { return PyLong_FromLongLong(p->d[1].nbytes); }
static PyObject *Pair_get_n(Pair *p, void *c) {
    return PyLong_FromLongLong(p->d[0].nbytes + p->d[1].nbytes);
}
static PyObject *Pair_get_done(Pair *p, void *c) { return PyBool_FromLong(p->done); }

static PyGetSetDef Pair_getset[] = {
    {"bytes_up", (getter)Pair_get_up, NULL, "bytes relayed client -> backend", NULL},
    {"bytes_down", (getter)Pair_get_down, NULL, "bytes relayed backend -> client", NULL},
    {"nbytes", (getter)Pair_get_n, NULL, "bytes relayed both ways", NULL},
    {"done", (getter)Pair_get_done, NULL, "ended (on_done was called)", NULL},
    {NULL},
};

static PyMemberDef Pair_members[] = {
    {"tag", T_OBJECT, offsetof(Pair, tag), 0, "the owner's record of this connection"},
    {"started", T_DOUBLE, offsetof(Pair, started), 0, "when the relay started"},
    {"outcome", T_OBJECT, offsetof(Pair, outcome), READONLY, "how it ended"},
    {NULL},
};

static PyMethodDef Pair_methods[] = {
    {"start", (PyCFunction)Pair_start, METH_VARARGS, Pair_start_doc},
    {"abort", (PyCFunction)Pair_abort, METH_O, Pair_abort_doc},
    {NULL},
};

static PyTypeObject PairType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "forwarder.traffic._core.Pair",
    .tp_basicsize = sizeof(Pair),
    .tp_dealloc = (destructor)Pair_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A client/backend pair relayed by the compiled core (made by Relay.pair).",
    .tp_methods = Pair_methods,
    .tp_members = Pair_members,
    .tp_getset = Pair_getset,
};

/* --- Relay ---------------------------------------------------------------------------- */

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if (PyTuple_GET_SIZE(args) || (kw != NULL && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Relay() takes no arguments");
        return NULL;
    }
    Relay *r = (Relay *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    r->ep = epoll_create1(EPOLL_CLOEXEC);
    if (r->ep < 0) {
        Py_DECREF(r);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    r->grave = PyList_New(0);
    if (r->grave == NULL) {
        Py_DECREF(r);
        return NULL;
    }
    return (PyObject *)r;
}

static void Relay_dealloc(Relay *r) {
    if (r->ep >= 0)
        close(r->ep);
    Py_XDECREF(r->grave);
    Py_XDECREF(r->err_type);
    Py_XDECREF(r->err_value);
    Py_XDECREF(r->err_tb);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

PyDoc_STRVAR(Relay_pair_doc,
"pair(client_fd, backend_fd, on_done, tag=None) -> Pair -- the pair owns both fds from "
"now on (detach them from their socket objects first); both must be non-blocking");

static PyObject *Relay_pair(Relay *r, PyObject *args) {
    int cfd, bfd;
    PyObject *on_done, *tag = Py_None;
    if (!PyArg_ParseTuple(args, "iiO|O:pair", &cfd, &bfd, &on_done, &tag))
        return NULL;
    if (r->ep < 0) {
        PyErr_SetString(PyExc_ValueError, "relay is closed");
        return NULL;
    }
    Pair *p = PyObject_New(Pair, &PairType);
    if (p == NULL)
        return NULL;
    Py_INCREF(r);
    p->relay = r;
    p->fd[0] = cfd;
    p->fd[1] = bfd;
    for (int i = 0; i < 2; i++) {
        Dir *d = &p->d[i];
        memset(d, 0, sizeof *d);
        d->src = p->fd[i];
        d->dst = p->fd[1 - i];
        d->pipe_r = d->pipe_w = -1;
        p->s[i].pair = p;
        p->s[i].idx = i;
        p->s[i].mask = 0;
    }
    p->done = p->held_ref = 0;
    p->started = 0.0;
    Py_INCREF(on_done);
    p->on_done = on_done;
    Py_INCREF(tag);
    p->tag = tag;
    Py_INCREF(str_spliced);
    p->outcome = str_spliced;
    return (PyObject *)p;
}

static PyObject *Relay_poll(Relay *r, PyObject *unused) {
    struct epoll_event evs[BATCH];
    if (r->ep < 0)
        Py_RETURN_NONE;
    int n = epoll_wait(r->ep, evs, BATCH, 0);
    if (n < 0) {
        if (errno == EINTR)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    r->in_poll = 1;
    for (int k = 0; k < n; k++) {
        Slot *s = evs[k].data.ptr;
        Pair *p = s->pair;
        uint32_t ev = evs[k].events;
        int i = s->idx;
        if (p->done)
            continue;  /* ended earlier in this batch */
        if ((ev & EV_IN) && p->d[i].reading && on_readable(p, &p->d[i]) < 0)
            continue;
        if ((ev & EV_OUT) && p->d[1 - i].writing)
            on_writable(p, &p->d[1 - i]);
    }
    r->in_poll = 0;
    PyList_SetSlice(r->grave, 0, PY_SSIZE_T_MAX, NULL);
    if (r->err_type != NULL) {
        PyErr_Restore(r->err_type, r->err_value, r->err_tb);
        r->err_type = r->err_value = r->err_tb = NULL;
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Relay_fileno(Relay *r, PyObject *unused) { return PyLong_FromLong(r->ep); }

static PyObject *Relay_close(Relay *r, PyObject *unused) {
    if (r->ep >= 0) {
        close(r->ep);
        r->ep = -1;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Relay_methods[] = {
    {"pair", (PyCFunction)Relay_pair, METH_VARARGS, Relay_pair_doc},
    {"poll", (PyCFunction)Relay_poll, METH_NOARGS,
     "poll() -- handle every ready event now (call when fileno() is readable)"},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "the epoll fd the loop polls"},
    {"close", (PyCFunction)Relay_close, METH_NOARGS, "close the epoll set"},
    {NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "forwarder.traffic._core.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One epoll set of relayed pairs (one per event loop).",
    .tp_methods = Relay_methods,
    .tp_new = Relay_new,
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "_core",
    "The relay's compiled core (splice.py's rules in C; see forwarder/traffic/core.py).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&RelayType) < 0 || PyType_Ready(&PairType) < 0)
        return NULL;
    str_spliced = PyUnicode_InternFromString("spliced");
    str_error = PyUnicode_InternFromString("error");
    if (str_spliced == NULL || str_error == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "COPY_MAX", COPY_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
