// Package containerinit starts a container process for the node agent: it runs in the child the
// agent cloned into fresh mount and UTS namespaces, before the container's program. It imports
// nothing but the standard library and x/sys/unix, so that the small binary built from it
// (cmd/localcluster-container-init) starts in a few milliseconds: the localcluster binary
// re-executed for this (the fallback) first runs the init functions of every Kubernetes package
// it links, 150-350 ms per container start on a 2-core machine.
package containerinit

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Argv0 is the program name the container init runs under: the helper binary's file name, and the
// argv[0] under which the localcluster binary re-executed runs Main from an init function. In fresh
// mount and UTS namespaces (clone flags), before anything else it reads its Spec from fd 3, joins the
// pod's network namespace, makes its mounts private, bind-mounts the volumes at their mountPaths
// (plus the pod's /etc/hosts and /etc/resolv.conf), makes / read-only when asked, sets the
// hostname, drops to the container's user and execs the program: the process the node agent
// supervises is then the program itself.
const Argv0 = "localcluster-container-init"

// DefaultPath is the PATH of a container whose image and spec set none.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// BindMount is one volume (or /etc file) bind-mounted into the container.
type BindMount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly"`
}

// Spec is what the node agent writes to the container init's fd 3.
type Spec struct {
	Netns          string      `json:"netns"`
	Hostname       string      `json:"hostname"`
	Mounts         []BindMount `json:"mounts"`
	ReadOnlyRoot   bool        `json:"readOnlyRoot"`
	WorkingDir     string      `json:"workingDir"`
	UID            int64       `json:"uid"`
	GID            int64       `json:"gid"`
	Groups         []int64     `json:"groups"`
	Argv           []string    `json:"argv"`
	Env            []string    `json:"env"`
	ParentDeathSig bool        `json:"parentDeathSig"`
}

// Main sets the container up and execs its program; it returns only by exiting (127) when that
// fails. The calling goroutine stays on its thread: the network namespace it joins is the
// thread's, and the exec happens from it.
func Main() {
	runtime.LockOSThread()
	err := run()
	fmt.Fprintf(os.Stderr, "localcluster: starting the container failed: %v\n", err)
	os.Exit(127)
}

func run() error {
	f := os.NewFile(3, "spec")
	var spec Spec
	if err := json.NewDecoder(f).Decode(&spec); err != nil {
		return fmt.Errorf("reading the launch spec: %w", err)
	}
	_ = f.Close()
	if spec.Netns != "" {
		ns, err := os.Open(spec.Netns)
		if err != nil {
			return fmt.Errorf("opening netns: %w", err)
		}
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("joining netns %s: %w", spec.Netns, err)
		}
		_ = ns.Close()
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making mounts private: %w", err)
	}
	mounts := append([]BindMount{}, spec.Mounts...)
	// Parents before children (a volume at /var/lib/rabbitmq, another at /var/lib/rabbitmq/mnesia).
	sort.SliceStable(mounts, func(i, j int) bool {
		return strings.Count(filepath.Clean(mounts[i].Target), "/") < strings.Count(filepath.Clean(mounts[j].Target), "/")
	})
	// Open every source before mounting anything: a volume mounted at /tmp must not hide a
	// source that lives under /tmp (the state dir may).
	sources := make([]*os.File, len(mounts))
	for i, m := range mounts {
		fd, err := unix.Open(m.Source, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("volume source %s: %w", m.Source, err)
		}
		sources[i] = os.NewFile(uintptr(fd), m.Source)
	}
	for i, m := range mounts {
		if err := bindOne(m, sources[i]); err != nil {
			return err
		}
		_ = sources[i].Close()
	}
	if spec.ReadOnlyRoot {
		if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("read-only root: %w", err)
		}
	}
	if spec.Hostname != "" {
		if err := unix.Sethostname([]byte(spec.Hostname)); err != nil {
			return fmt.Errorf("sethostname: %w", err)
		}
	}
	wd := spec.WorkingDir
	if wd == "" {
		wd = "/"
	}
	if err := os.Chdir(wd); err != nil {
		return fmt.Errorf("working directory %s: %w", wd, err)
	}
	if len(spec.Argv) == 0 {
		return fmt.Errorf("empty command")
	}
	path, err := lookPath(spec.Argv[0], envValue(spec.Env, "PATH"))
	if err != nil {
		return err
	}
	// Open the program while still root: the container user may not traverse the directories
	// above it (cargo's target dir under a 0700 home); exec then needs only the file's own x bit.
	prog, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", path, err)
	}
	groups := make([]int, 0, len(spec.Groups))
	for _, g := range spec.Groups {
		groups = append(groups, int(g))
	}
	if err := syscall.Setgroups(groups); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setgid(int(spec.GID)); err != nil {
		return fmt.Errorf("setgid %d: %w", spec.GID, err)
	}
	if err := syscall.Setuid(int(spec.UID)); err != nil {
		return fmt.Errorf("setuid %d: %w", spec.UID, err)
	}
	if spec.ParentDeathSig {
		// Changing credentials cleared it; the parent is the node agent.
		if err := unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0); err != nil {
			return fmt.Errorf("pdeathsig: %w", err)
		}
	}
	return execFD(prog, path, spec.Argv, spec.Env)
}

// execFD execs the opened program (execveat AT_EMPTY_PATH); scripts, which their interpreter
// must open by path, are exec'd by path.
func execFD(fd int, path string, argv, env []string) error {
	head := make([]byte, 2)
	if f, err := os.Open(path); err == nil {
		_, _ = f.Read(head)
		_ = f.Close()
	}
	if string(head) == "#!" {
		return syscall.Exec(path, argv, env)
	}
	argvp, err := syscall.SlicePtrFromStrings(argv)
	if err != nil {
		return err
	}
	envp, err := syscall.SlicePtrFromStrings(env)
	if err != nil {
		return err
	}
	empty, err := syscall.BytePtrFromString("")
	if err != nil {
		return err
	}
	_, _, errno := syscall.Syscall6(unix.SYS_EXECVEAT, uintptr(fd), uintptr(unsafe.Pointer(empty)),
		uintptr(unsafe.Pointer(&argvp[0])), uintptr(unsafe.Pointer(&envp[0])), unix.AT_EMPTY_PATH, 0)
	return fmt.Errorf("exec %s: %w", path, errno)
}

func bindOne(m BindMount, src *os.File) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(src.Fd()), &st); err != nil {
		return fmt.Errorf("volume source %s: %w", m.Source, err)
	}
	if err := ensureMountpoint(m.Target, st.Mode&unix.S_IFMT == unix.S_IFDIR); err != nil {
		return err
	}
	procPath := fmt.Sprintf("/proc/self/fd/%d", src.Fd())
	if err := unix.Mount(procPath, m.Target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s at %s: %w", m.Source, m.Target, err)
	}
	if m.ReadOnly {
		if err := unix.Mount("", m.Target, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("read-only %s: %w", m.Target, err)
		}
	}
	return nil
}

// ensureMountpoint creates a missing mountpoint (an empty directory or file on the host file
// system: there is no per-container root file system here).
func ensureMountpoint(target string, dir bool) error {
	if _, err := os.Stat(target); err == nil {
		return nil
	}
	if dir {
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("mountpoint %s: %w", target, err)
		}
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return fmt.Errorf("mountpoint %s: %w", target, err)
	}
	f, err := os.OpenFile(target, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return fmt.Errorf("mountpoint %s: %w", target, err)
	}
	return f.Close()
}

func envValue(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if strings.HasPrefix(env[i], key+"=") {
			return env[i][len(key)+1:]
		}
	}
	return ""
}

// lookPath resolves a command against the container's PATH (not the node agent's).
func lookPath(name, pathEnv string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	if pathEnv == "" {
		pathEnv = DefaultPath
	}
	for _, dir := range filepath.SplitList(pathEnv) {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%q: executable file not found in $PATH (%s)", name, pathEnv)
}
