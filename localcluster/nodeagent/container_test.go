package nodeagent

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"warren.dev/localcluster/internal/containerinit"
)

// TestContainerProcessNamespacesAndMounts starts a real container process through the init
// helper: a volume bind-mounted at an absolute path that does not exist on the host side of the
// mount namespace, its own hostname, a non-root user, a read-only root, and exec into it.
func TestContainerProcessNamespacesAndMounts(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	checkContainerProcess(t, self)
}

// TestContainerInitHelper builds cmd/localcluster-container-init, checks the node agent picks it
// when it lies next to its own binary (and itself otherwise), and runs the same container
// through it as through the re-executed binary.
func TestContainerInitHelper(t *testing.T) {
	bin := t.TempDir()
	helper := filepath.Join(bin, containerinit.Argv0)
	build := exec.Command("go", "build", "-o", helper, "warren.dev/localcluster/cmd/localcluster-container-init")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build of the helper: %v\n%s", err, out)
	}
	agentBinary := filepath.Join(bin, "localcluster")
	if got := containerInitProgram(agentBinary); got != helper {
		t.Errorf("init program beside the helper: %q, want %q", got, helper)
	}
	alone := filepath.Join(t.TempDir(), "localcluster")
	if got := containerInitProgram(alone); got != alone {
		t.Errorf("init program with no helper beside it: %q, want the binary itself", got)
	}
	checkContainerProcess(t, helper)
}

func checkContainerProcess(t *testing.T, initProgram string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test starts processes in new mount/UTS namespaces and needs root")
	}
	tmp := t.TempDir()
	if err := os.Chmod(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(tmp, "vol")
	if err := os.MkdirAll(vol, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(vol, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(vol, "conf"), []byte("from-volume"), 0o644); err != nil {
		t.Fatal(err)
	}
	privateTmp := filepath.Join(tmp, "private-tmp")
	if err := os.MkdirAll(privateTmp, 0o777); err != nil {
		t.Fatal(err)
	}
	hosts := filepath.Join(tmp, "hosts")
	if err := os.WriteFile(hosts, []byte("10.9.9.9\tpod-under-test\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	mountRoot := "/run/localcluster-test-" + filepath.Base(tmp)
	target := mountRoot + "/etc/app"
	// The empty mountpoint is created on the host (there is no per-container root file system).
	t.Cleanup(func() { _ = os.RemoveAll(mountRoot) })
	script := strings.Join([]string{
		"cat " + target + "/conf; echo",
		"hostname",
		"id -u",
		"grep -c pod-under-test /etc/hosts",
		"touch /localcluster-ro-test 2>/dev/null && echo root-writable || echo root-read-only",
		"echo written > " + target + "/out",
		"echo $GREETING",
		"exec sleep 30",
	}, "; ")
	spec := launchSpec{
		Hostname: "pod-under-test",
		Mounts: []bindMount{
			{Source: vol, Target: target},
			{Source: hosts, Target: "/etc/hosts", ReadOnly: true},
			// Mounted first (shallower) and hiding the other sources, which live under /tmp.
			{Source: privateTmp, Target: os.TempDir()},
		},
		ReadOnlyRoot: true,
		UID:          65534, GID: 65534,
		Argv: []string{"sh", "-c", script},
		Env:  []string{"PATH=" + defaultPath, "GREETING=hello-env"},
	}
	logPath := filepath.Join(tmp, "logs", "0.log")
	p, err := startProcess(initProgram, spec, logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer p.stop(time.Second)
	deadline := time.Now().Add(30 * time.Second)
	var out string
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(logPath)
		out = string(b)
		if strings.Contains(out, "hello-env") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, want := range []string{"from-volume\n", "pod-under-test\n", "65534\n", "1\n", "root-read-only\n", "hello-env\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("container output lacks %q:\n%s", want, out)
		}
	}
	if b, err := os.ReadFile(filepath.Join(vol, "out")); err != nil || string(b) != "written\n" {
		t.Errorf("write through the volume: %q %v", b, err)
	}
	if _, err := os.Stat(filepath.Join("/localcluster-ro-test")); err == nil {
		t.Error("the container wrote to the host's root")
	}
	// The host never sees the container's mount.
	if _, err := os.Stat(filepath.Join(target, "conf")); err == nil {
		t.Error("the volume mount leaked into the host's mount namespace")
	}
	var stdout strings.Builder
	code, err := execInContainer(context.Background(), p.pid, 65534, 65534, spec.Env, "", []string{"sh", "-c", "cat " + target + "/conf; echo; hostname; id -u"}, nil, &stdout, &stdout)
	if err != nil || code != 0 {
		t.Fatalf("exec: code %d err %v out %q", code, err, stdout.String())
	}
	if got := stdout.String(); got != "from-volume\npod-under-test\n65534\n" {
		t.Errorf("exec output %q", got)
	}
	code, err = execInContainer(context.Background(), p.pid, 65534, 65534, spec.Env, "", []string{"sh", "-c", "exit 3"}, nil, nil, nil)
	if err != nil || code != 3 {
		t.Errorf("exec exit code %d (%v), want 3", code, err)
	}
	start := time.Now()
	p.stop(10 * time.Second)
	if p.exitCode != 128+15 {
		t.Errorf("exit code after SIGTERM %d, want 143", p.exitCode)
	}
	if time.Since(start) > 5*time.Second {
		t.Errorf("SIGTERM took %s: sleep should have died at once", time.Since(start))
	}
}

func TestStopEscalatesToSIGKILL(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test starts processes in new namespaces and needs root")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	logPath := filepath.Join(tmp, "0.log")
	p, err := startProcess(self, launchSpec{Argv: []string{"sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"}, Env: []string{"PATH=" + defaultPath}}, logPath)
	if err != nil {
		t.Fatal(err)
	}
	// The trap must be in place before SIGTERM is sent.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if b, _ := os.ReadFile(logPath); strings.Contains(string(b), "ready") {
			break
		}
		if time.Now().After(deadline) {
			p.stop(0)
			t.Fatal("the container never printed ready")
		}
		time.Sleep(50 * time.Millisecond)
	}
	start := time.Now()
	p.stop(time.Second)
	if p.exitCode != 128+9 {
		t.Errorf("exit code %d, want 137 (SIGKILL after the grace period)", p.exitCode)
	}
	if el := time.Since(start); el < time.Second {
		t.Errorf("stopped after %s, before the grace period", el)
	}
}

func TestSeekTail(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "log")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b strings.Builder
	for i := 0; i < 5000; i++ {
		b.WriteString("line ")
		b.WriteString(strings.Repeat("x", i%7))
		b.WriteString("\n")
	}
	if _, err := f.WriteString(b.String()); err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{1, 3, 4999, 5000, 7000} {
		if err := seekTail(f, n); err != nil {
			t.Fatal(err)
		}
		rest, err := os.ReadFile(f.Name())
		if err != nil {
			t.Fatal(err)
		}
		pos, _ := f.Seek(0, 1)
		got := strings.Count(string(rest[pos:]), "\n")
		want := n
		if want > 5000 {
			want = 5000
		}
		if got != want {
			t.Errorf("tail %d: %d lines", n, got)
		}
	}
}

// TestProgramBehindPrivateDirectory: cargo's binaries live under a 0700 home; the container user
// must still be able to run them (the program is opened as root, then exec'd by descriptor).
func TestProgramBehindPrivateDirectory(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test starts processes in new namespaces and needs root")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	private := filepath.Join(tmp, "home")
	if err := os.MkdirAll(private, 0o700); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile("/usr/bin/id")
	if err != nil {
		t.Fatal(err)
	}
	prog := filepath.Join(private, "id")
	if err := os.WriteFile(prog, raw, 0o755); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(tmp, "0.log")
	p, err := startProcess(self, launchSpec{UID: 65534, GID: 65534, Argv: []string{prog, "-u"}, Env: []string{"PATH=" + defaultPath}}, logPath)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		p.stop(0)
		t.Fatal("the program did not finish")
	}
	out, _ := os.ReadFile(logPath)
	if p.exitCode != 0 || string(out) != "65534\n" {
		t.Errorf("exit %d, output %q", p.exitCode, out)
	}
}

// TestReopenStderrAsContainerUser: a non-root program that reopens /dev/stderr (curl -o
// /dev/stderr in the chart's helm test) must be able to write its log.
func TestReopenStderrAsContainerUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test starts processes in new namespaces and needs root")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(t.TempDir(), "0.log")
	p, err := startProcess(self, launchSpec{UID: 65534, GID: 65534, Argv: []string{"sh", "-c", "echo reopened > /dev/stderr"}, Env: []string{"PATH=" + defaultPath}}, logPath)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		p.stop(0)
		t.Fatal("the program did not finish")
	}
	out, _ := os.ReadFile(logPath)
	if p.exitCode != 0 || string(out) != "reopened\n" {
		t.Errorf("exit %d, output %q", p.exitCode, out)
	}
}
