package nodeagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
	"warren.dev/localcluster/internal/containerinit"

	"golang.org/x/sys/unix"
)

// process is one running instance of a container.
type process struct {
	cmd     *exec.Cmd
	pid     int
	started time.Time
	exited  chan struct{}
	// set once exited is closed
	exitCode int
	signal   string
}

// startProcess launches the container init (initProgram: the helper binary, or this binary) in
// new mount and UTS namespaces; it execs the container's program, so the pid is the program's.
func startProcess(initProgram string, spec launchSpec, logPath string) (*process, error) {
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("log file: %w", err)
	}
	defer logf.Close()
	// The container's user owns its log: a program that reopens /dev/stdout or /dev/stderr
	// (curl -o /dev/stderr in the chart's helm test) opens this file anew, with permission
	// checks, as that user (under a container runtime those are pipes it may reopen).
	if err := logf.Chown(int(spec.UID), int(spec.GID)); err != nil {
		return nil, fmt.Errorf("log file owner: %w", err)
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	cmd := &exec.Cmd{
		Path:       initProgram,
		Args:       []string{containerinit.Argv0},
		Env:        []string{},
		Stdout:     logf,
		Stderr:     logf,
		ExtraFiles: []*os.File{r},
		SysProcAttr: &syscall.SysProcAttr{
			Cloneflags: unix.CLONE_NEWNS | unix.CLONE_NEWUTS,
			Setpgid:    true,
			Pdeathsig:  syscall.SIGKILL,
		},
	}
	if err := cmd.Start(); err != nil {
		_ = w.Close()
		return nil, fmt.Errorf("starting %v: %w", spec.Argv, err)
	}
	go func() {
		_, _ = w.Write(raw)
		_ = w.Close()
	}()
	p := &process{cmd: cmd, pid: cmd.Process.Pid, started: time.Now(), exited: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		p.exitCode = 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				p.exitCode = 128 + int(ws.Signal())
				p.signal = ws.Signal().String()
			} else {
				p.exitCode = ee.ExitCode()
			}
		} else if err != nil {
			p.exitCode = 128
		}
		close(p.exited)
	}()
	return p, nil
}

// stop sends SIGTERM to the process group, waits up to grace, then SIGKILLs the group.
func (p *process) stop(grace time.Duration) {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = syscall.Kill(-p.pid, syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.exited:
	case <-t.C:
	}
	_ = syscall.Kill(-p.pid, syscall.SIGKILL)
	<-p.exited
}

// execInContainer runs a command in the namespaces of a running container, as its user and with
// its environment (exec probes, kubectl exec). nsenter is single-threaded, which joining a mount
// namespace requires.
func execInContainer(ctx context.Context, pid int, uid, gid int64, env []string, workDir string, argv []string, stdin io.Reader, stdout, stderr io.Writer) (int, error) {
	if len(argv) == 0 {
		return -1, fmt.Errorf("empty command")
	}
	args := []string{"-t", strconv.Itoa(pid), "-m", "-u", "-n", "-S", strconv.FormatInt(uid, 10), "-G", strconv.FormatInt(gid, 10)}
	if workDir != "" {
		args = append(args, "--wd="+workDir)
	}
	// nsenter resolves argv[0] with execvp against the environment given here: the container's PATH.
	args = append(append(args, "--"), argv...)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	cmd.Env = env
	cmd.Stdin = stdin
	cmd.Stdout = stdout
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	err := cmd.Run()
	if err == nil {
		return 0, nil
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), nil
	}
	return -1, err
}

// killNetnsProcesses kills what is left in a pod's network namespace (daemons such as epmd that
// left the container's process group).
func killNetnsProcesses(nsFile string) {
	var st unix.Stat_t
	if err := unix.Stat(nsFile, &st); err != nil {
		return
	}
	want := fmt.Sprintf("net:[%d]", st.Ino)
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		link, err := os.Readlink(filepath.Join("/proc", e.Name(), "ns", "net"))
		if err == nil && link == want {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
