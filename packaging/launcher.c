/*
 * The `wgcni` executable: starts the bundle's own libpython in-process and calls cni_plugin.main.main().
 *
 * It replaces PyInstaller's bootloader for this one bundle (PyInstaller still builds _internal/: the interpreter, the
 * stdlib and cni_plugin as loose .pyc files, the extension modules) because kubelet pays the start-up on every pod
 * ADD and DEL, and the bootloader re-executes itself on Linux and bootstraps through its archive before any of
 * wgcni's code runs (docs/benchmarks.md, "P1: where the packaged plugin's time goes").
 *
 * The interpreter is configured as the bundle ran before (`-S -E -B`, isolated): no site, no PYTHON* variables, no
 * user site, no .pyc writes, and a module path of _internal/ and its lib-dynload/ only, found from /proc/self/exe, so
 * a symlink such as /opt/cni/bin/wgcni -> /opt/wgcni/wgcni/wgcni works. The executable carries an RPATH (not a
 * RUNPATH) of $ORIGIN/_internal: the dynamic loader then also resolves the extension modules' libraries (libz,
 * libcrypto) from the bundle, which PyInstaller's re-exec did with LD_LIBRARY_PATH.
 *
 * If the interpreter cannot start (a damaged bundle), the reason goes to stderr and, when a CNI runtime is calling,
 * also to stdout as a CNI error object (code 999), so that kubelet's event says what is wrong; exit status 1.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ENTRY_MODULE "cni_plugin.main"
#define DYNLOAD_DIR "python" Py_STRINGIFY(PY_MAJOR_VERSION) "." Py_STRINGIFY(PY_MINOR_VERSION) "/lib-dynload"

/* Appends text to a JSON string being built, dropping what would need escaping (the texts are fixed messages and
 * the bundle's paths); returns the new length. */
static size_t append_json_text(char *buffer, size_t length, size_t size, const char *text)
{
    for (; length + 1 < size && *text; text++)
        if (*text != '"' && *text != '\\' && (unsigned char)*text >= 0x20)
            buffer[length++] = *text;
    buffer[length] = '\0';
    return length;
}

/* Says why the bundle cannot run, where the caller will see it; never returns. */
static void fail(const char *what, const char *detail)
{
    detail = detail ? detail : "unknown error";
    fprintf(stderr, "wgcni: %s: %s\n", what, detail);
    if (getenv("CNI_COMMAND") != NULL) {
        char message[PATH_MAX + 256];
        size_t length = append_json_text(message, 0, sizeof(message), what);
        length = append_json_text(message, length, sizeof(message), ": ");
        append_json_text(message, length, sizeof(message), detail);
        printf("{\"cniVersion\": \"1.0.0\", \"code\": 999, \"msg\": \"wgcni cannot start: %s\", "
               "\"details\": \"the plugin bundle is damaged or incomplete; reinstall wgcni\"}\n", message);
        fflush(stdout);
    }
    exit(1);
}

static void check(PyStatus status, PyConfig *config)
{
    if (!PyStatus_Exception(status))
        return;
    if (config != NULL)
        PyConfig_Clear(config);
    if (PyStatus_IsExit(status))
        exit(status.exitcode);
    fail("the Python runtime did not start", status.err_msg);
}

/* The pending exception as one line ("No module named 'cni_plugin'"), not a traceback. */
static const char *exception_text(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback); /* Python 3.11: PyErr_GetRaisedException is 3.12's */
    PyErr_NormalizeException(&type, &value, &traceback);
    PyObject *text = value != NULL ? PyObject_Str(value) : NULL;
    const char *utf8 = text != NULL ? PyUnicode_AsUTF8(text) : NULL;
    return utf8 != NULL && *utf8 ? utf8 : "an import failed";
}

static void append_path(PyConfig *config, const char *path)
{
    wchar_t *wide = Py_DecodeLocale(path, NULL);
    if (wide == NULL)
        fail("cannot decode the bundle's path", path);
    check(PyWideStringList_Append(&config->module_search_paths, wide), config);
    PyMem_RawFree(wide);
}

int main(int argc, char **argv)
{
    char executable[PATH_MAX];
    ssize_t length = readlink("/proc/self/exe", executable, sizeof(executable) - 1);
    if (length <= 0 || (size_t)length >= sizeof(executable) - 1)
        fail("cannot find its own executable", "/proc/self/exe");
    executable[length] = '\0';

    char internal[PATH_MAX], dynload[PATH_MAX];
    char *slash = strrchr(executable, '/');
    int directory = (int)(slash - executable);
    if (snprintf(internal, sizeof(internal), "%.*s/_internal", directory, executable) >= (int)sizeof(internal) ||
        snprintf(dynload, sizeof(dynload), "%s/" DYNLOAD_DIR, internal) >= (int)sizeof(dynload))
        fail("the bundle's path is too long", executable);
    if (access(internal, R_OK | X_OK) != 0)
        fail("its _internal directory is missing", internal);

    PyPreConfig preconfig;
    PyPreConfig_InitIsolatedConfig(&preconfig);
    preconfig.utf8_mode = 1; /* CNI's JSON is UTF-8 whatever locale kubelet's environment has */
    check(Py_PreInitialize(&preconfig), NULL);

    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.site_import = 0;
    config.write_bytecode = 0;
    config.install_signal_handlers = 1;
    config.pathconfig_warnings = 0;
    config.parse_argv = 0; /* argv belongs to the CLI, not to the interpreter */
    check(PyConfig_SetBytesArgv(&config, argc, argv), &config);
    check(PyConfig_SetBytesString(&config, &config.program_name, argc > 0 ? argv[0] : "wgcni"), &config);
    check(PyConfig_SetBytesString(&config, &config.executable, executable), &config);
    check(PyConfig_SetBytesString(&config, &config.home, internal), &config);
    config.module_search_paths_set = 1;
    append_path(&config, internal);
    append_path(&config, dynload);
    check(Py_InitializeFromConfig(&config), &config);
    PyConfig_Clear(&config);

    PyObject *module = PyImport_ImportModule(ENTRY_MODULE);
    if (module == NULL)
        fail("its Python modules are incomplete", exception_text());
    int exit_code = 0;
    PyObject *result = PyObject_CallMethod(module, "main", NULL);
    if (result == NULL) {
        exit_code = 1;
        PyErr_Print(); /* a SystemExit (the CLI's sys.exit) exits here with its code, as `python -m` would */
    }
    Py_XDECREF(result);
    Py_DECREF(module);
    if (Py_FinalizeEx() < 0 && exit_code == 0)
        exit_code = 120; /* as CPython's own main: flushing stdout failed at exit */
    return exit_code;
}
