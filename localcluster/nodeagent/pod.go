package nodeagent

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/third_party/forked/golang/expansion"
)

// podRuntime runs one pod: sandbox (netns, IP, hosts/resolv.conf), volumes, init containers in
// order, then the app containers, each supervised (probes, restarts); it writes the pod status
// the way a kubelet does and, on deletion, stops everything and removes the pod object.
type podRuntime struct {
	a   *agent
	uid types.UID
	dir string
	// logDir holds the containers' logs (see logPath); it outlives dir.
	logDir string

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
	dirty  chan struct{}

	mu          sync.Mutex
	pod         *corev1.Pod
	ip          netip.Addr
	startTime   metav1.Time
	sandboxErr  string
	initialized bool
	started     bool // app containers launched
	failed      bool // an init container failed with restartPolicy Never
	terminating bool
	initC       []*containerRuntime
	appC        []*containerRuntime
	transitions map[corev1.PodConditionType]metav1.Time
	lastCond    map[corev1.PodConditionType]corev1.ConditionStatus
}

type containerRuntime struct {
	spec    corev1.Container
	isInit  bool
	status  corev1.ContainerStatus
	proc    *process
	launch  launchSpec
	ready   bool
	started bool
	// kill asks the supervisor to stop the current instance (liveness failure).
	kill chan struct{}
}

func newPodRuntime(a *agent, pod *corev1.Pod) *podRuntime {
	ctx, cancel := context.WithCancel(a.ctx)
	r := &podRuntime{
		a: a, uid: pod.UID, pod: pod.DeepCopy(),
		dir:    filepath.Join(a.podsDir, string(pod.UID)),
		logDir: filepath.Join(a.logsDir, pod.Namespace+"_"+pod.Name+"_"+string(pod.UID)),
		ctx:    ctx, cancel: cancel,
		done:        make(chan struct{}),
		dirty:       make(chan struct{}, 1),
		startTime:   metav1.Now(),
		transitions: map[corev1.PodConditionType]metav1.Time{},
		lastCond:    map[corev1.PodConditionType]corev1.ConditionStatus{},
	}
	for _, c := range pod.Spec.InitContainers {
		r.initC = append(r.initC, newContainerRuntime(c, true))
	}
	for _, c := range pod.Spec.Containers {
		r.appC = append(r.appC, newContainerRuntime(c, false))
	}
	return r
}

func newContainerRuntime(c corev1.Container, isInit bool) *containerRuntime {
	return &containerRuntime{
		spec: c, isInit: isInit, kill: make(chan struct{}, 1),
		status: corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: "localcluster://" + imageRepository(c.Image),
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "PodInitializing"}},
		},
	}
}

func (r *podRuntime) logf(format string, args ...any) {
	klog.InfoS(fmt.Sprintf(format, args...), "pod", klog.KObj(r.pod))
}

// event records a Kubernetes Event on the pod (what `kubectl describe pod` shows) and logs it.
func (r *podRuntime) event(warning bool, reason, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.logf("%s: %s", reason, msg)
	if r.a.recorder == nil {
		return
	}
	typ := corev1.EventTypeNormal
	if warning {
		typ = corev1.EventTypeWarning
	}
	r.mu.Lock()
	pod := r.pod
	r.mu.Unlock()
	r.a.recorder.Event(pod, typ, reason, msg)
}

func (r *podRuntime) notify() {
	select {
	case r.dirty <- struct{}{}:
	default:
	}
}

func (r *podRuntime) hostname() string {
	h := r.pod.Spec.Hostname
	if h == "" {
		h = r.pod.Name
	}
	if len(h) > 63 {
		h = strings.TrimRight(h[:63], "-.")
	}
	return h
}

// run is the pod's main goroutine.
func (r *podRuntime) run() {
	defer close(r.done)
	go r.statusLoop()
	r.notify()
	if !r.prepare() {
		r.teardown()
		return
	}
	r.mu.Lock()
	r.sandboxErr = ""
	r.mu.Unlock()
	r.notify()
	for _, c := range r.initC {
		if !r.runInit(c) {
			r.teardown()
			return
		}
	}
	r.mu.Lock()
	r.initialized = true
	r.started = true
	r.mu.Unlock()
	r.notify()
	var wg sync.WaitGroup
	for _, c := range r.appC {
		wg.Add(1)
		go func(c *containerRuntime) {
			defer wg.Done()
			r.supervise(c)
		}(c)
	}
	wg.Wait()
	r.teardown()
}

// prepare builds the sandbox and volumes, retrying until it works or the pod goes away.
func (r *podRuntime) prepare() bool {
	backoff := time.Second
	for {
		err := r.prepareOnce()
		if err == nil {
			return true
		}
		r.mu.Lock()
		r.sandboxErr = err.Error()
		r.mu.Unlock()
		r.notify()
		r.event(true, "FailedMount", "preparing the pod: %v (retrying)", err)
		select {
		case <-r.ctx.Done():
			return false
		case <-time.After(backoff):
		}
		if backoff < 10*time.Second {
			backoff *= 2
		}
	}
}

func (r *podRuntime) prepareOnce() error {
	start := time.Now()
	var network time.Duration
	if !r.ip.IsValid() {
		ip, err := r.a.net.sandbox(r.ctx, string(r.uid))
		network = time.Since(start)
		if err != nil {
			return fmt.Errorf("pod network: %w", err)
		}
		r.mu.Lock()
		r.ip = ip
		r.mu.Unlock()
		r.notify()
	}
	if err := os.MkdirAll(filepath.Join(r.dir, "etc"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(r.dir, "etc", "hosts"), []byte(hostsFile(r.pod, r.ip.String(), r.hostname(), r.a.cfg.ClusterDomain)), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(r.dir, "etc", "resolv.conf"), []byte(resolvConf(r.pod, r.a.cfg.ClusterDNS, r.a.cfg.ClusterDomain)), 0o644); err != nil {
		return err
	}
	var fsGroup *int64
	if sc := r.pod.Spec.SecurityContext; sc != nil && sc.FSGroup != nil {
		g := *sc.FSGroup
		if m, err := r.podIDMapper(); err == nil {
			g = m.gid(g)
		}
		fsGroup = &g
	}
	for i := range r.pod.Spec.Volumes {
		v := &r.pod.Spec.Volumes[i]
		dir := filepath.Join(r.dir, "volumes", v.Name)
		switch {
		case v.EmptyDir != nil:
			if err := os.MkdirAll(dir, 0o777); err != nil {
				return err
			}
			if err := os.Chmod(dir, 0o777); err != nil {
				return err
			}
			if fsGroup != nil {
				if err := applyFSGroup(dir, *fsGroup, true); err != nil {
					return err
				}
			}
		case v.PersistentVolumeClaim != nil:
			p, err := r.a.ClaimPath(r.ctx, r.pod.Namespace, v.PersistentVolumeClaim.ClaimName)
			if err != nil {
				return fmt.Errorf("volume %s: %w", v.Name, err)
			}
			if fsGroup != nil {
				if err := applyFSGroup(p, *fsGroup, true); err != nil {
					return err
				}
			}
		case v.HostPath != nil:
			if v.HostPath.Type != nil && (*v.HostPath.Type == corev1.HostPathDirectoryOrCreate) {
				if err := os.MkdirAll(v.HostPath.Path, 0o755); err != nil {
					return err
				}
			}
		default:
			files, isFiles, err := volumeFiles(r.ctx, r.pod, v, r.a, r.addresses())
			if err != nil {
				return fmt.Errorf("volume %s: %w", v.Name, err)
			}
			if !isFiles {
				return fmt.Errorf("volume %s: unsupported volume type", v.Name)
			}
			if err := writeVolume(dir, files, fsGroup); err != nil {
				return fmt.Errorf("volume %s: %w", v.Name, err)
			}
		}
	}
	// The stages of a pod start, for the pod-start breakdown of e2e-bench's drain.
	klog.InfoS("pod sandbox and volumes ready", "pod", klog.KObj(r.pod),
		"network", network.Round(time.Millisecond), "total", time.Since(start).Round(time.Millisecond))
	return nil
}

func (r *podRuntime) podIDMapper() (idMapper, error) {
	for _, c := range append(append([]corev1.Container{}, r.pod.Spec.InitContainers...), r.pod.Spec.Containers...) {
		e, err := r.a.images.Lookup(c.Image)
		if err != nil {
			return idMapper{}, err
		}
		if e.User != nil {
			return newIDMapper(e, lookupAccount)
		}
	}
	return idMapper{}, nil
}

// volumeDir is where a pod volume lives on the host.
func (r *podRuntime) volumeDir(name string) (string, error) {
	for i := range r.pod.Spec.Volumes {
		v := &r.pod.Spec.Volumes[i]
		if v.Name != name {
			continue
		}
		switch {
		case v.PersistentVolumeClaim != nil:
			return r.a.ClaimPath(r.ctx, r.pod.Namespace, v.PersistentVolumeClaim.ClaimName)
		case v.HostPath != nil:
			return v.HostPath.Path, nil
		}
		return filepath.Join(r.dir, "volumes", name), nil
	}
	return "", fmt.Errorf("no volume %q in the pod", name)
}

func (r *podRuntime) addresses() podAddresses {
	return podAddresses{PodIP: r.ip.String(), HostIP: r.a.cfg.NodeIP}
}

// buildLaunch computes argv, env, mounts and identity of a container.
func (r *podRuntime) buildLaunch(c *containerRuntime) (launchSpec, error) {
	e, err := r.a.images.Lookup(c.spec.Image)
	if err != nil {
		return launchSpec{}, err
	}
	mapper, err := newIDMapper(e, lookupAccount)
	if err != nil {
		return launchSpec{}, err
	}
	env, err := containerEnv(r.pod, &c.spec, e.Env, serviceEnv(r.pod, r.a.services()), r.addresses(), r.hostname(), r.a)
	if err != nil {
		return launchSpec{}, err
	}
	envMap := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		envMap[k] = v
	}
	mapping := expansion.MappingFuncFor(envMap)
	argv := commandLine(e, &c.spec)
	for i := range argv {
		argv[i] = expansion.Expand(argv[i], mapping)
	}
	mounts := []bindMount{
		{Source: filepath.Join(r.dir, "etc", "hosts"), Target: "/etc/hosts"},
		{Source: filepath.Join(r.dir, "etc", "resolv.conf"), Target: "/etc/resolv.conf"},
	}
	for _, vm := range c.spec.VolumeMounts {
		dir, err := r.volumeDir(vm.Name)
		if err != nil {
			return launchSpec{}, err
		}
		sub := vm.SubPath
		if vm.SubPathExpr != "" {
			sub = expansion.Expand(vm.SubPathExpr, mapping)
		}
		src, err := subPathSource(dir, sub)
		if err != nil {
			return launchSpec{}, err
		}
		mounts = append(mounts, bindMount{Source: src, Target: vm.MountPath, ReadOnly: vm.ReadOnly})
	}
	id := containerIdentity(r.pod, &c.spec, mapper)
	ro := c.spec.SecurityContext != nil && c.spec.SecurityContext.ReadOnlyRootFilesystem != nil && *c.spec.SecurityContext.ReadOnlyRootFilesystem
	return launchSpec{
		Netns: nsPath(string(r.uid)), Hostname: r.hostname(), Mounts: mounts,
		ReadOnlyRoot: ro && !r.a.cfg.WritableRoot, WorkingDir: c.spec.WorkingDir,
		UID: id.UID, GID: id.GID, Groups: id.Groups, Argv: argv, Env: env, ParentDeathSig: true,
	}, nil
}

// logPath is where one instance of a container writes its output, in the kubelet's
// /var/log/pods layout: <state>/logs/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log.
// Unlike the pod directory it outlives the pod (removed with the state by make local-down),
// so a test can read what a deleted pod wrote last (crates/warren-e2e's job log).
func (r *podRuntime) logPath(c *containerRuntime, restart int32) string {
	return filepath.Join(r.logDir, c.spec.Name, strconv.Itoa(int(restart))+".log")
}

// startInstance launches one instance of a container and records it as running.
func (r *podRuntime) startInstance(c *containerRuntime) (*process, error) {
	select {
	case <-c.kill: // a stale liveness verdict about the previous instance
	default:
	}
	spec, err := r.buildLaunch(c)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	restart := c.status.RestartCount
	r.mu.Unlock()
	p, err := startProcess(r.a.initProgram, spec, r.logPath(c, restart))
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	c.proc = p
	c.launch = spec
	c.ready = false
	c.started = false
	c.status.ContainerID = fmt.Sprintf("localcluster://%s-%s-%d", r.uid, c.spec.Name, restart)
	c.status.State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(p.started)}}
	r.mu.Unlock()
	r.notify()
	r.event(false, "Started", "Started container %s (%s, pid %d)", c.spec.Name, spec.Argv[0], p.pid)
	return p, nil
}

// recordExit moves the container to terminated and returns the exit code.
func (r *podRuntime) recordExit(c *containerRuntime, p *process) int {
	reason := "Completed"
	if p.exitCode != 0 {
		reason = "Error"
	}
	r.mu.Lock()
	c.ready = false
	c.status.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
		ExitCode: int32(p.exitCode), Reason: reason, Signal: 0,
		StartedAt: metav1.NewTime(p.started), FinishedAt: metav1.Now(), ContainerID: c.status.ContainerID,
	}}
	r.mu.Unlock()
	r.notify()
	return p.exitCode
}

// waitBackoff shows CrashLoopBackOff (or the launch error) while waiting before a restart.
func (r *podRuntime) waitBackoff(c *containerRuntime, d time.Duration, reason, msg string) bool {
	r.mu.Lock()
	if c.status.State.Terminated != nil {
		c.status.LastTerminationState = c.status.State
	}
	c.status.State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reason, Message: msg}}
	r.mu.Unlock()
	r.notify()
	select {
	case <-r.ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

func nextBackoff(cur time.Duration) time.Duration {
	if cur == 0 {
		return 10 * time.Second
	}
	if cur*2 > 5*time.Minute {
		return 5 * time.Minute
	}
	return cur * 2
}

// runInit runs an init container to completion; false means the pod cannot go on.
func (r *podRuntime) runInit(c *containerRuntime) bool {
	var backoff time.Duration
	for {
		p, err := r.startInstance(c)
		if err != nil {
			r.event(true, "Failed", "init container %s: %v", c.spec.Name, err)
			backoff = nextBackoff(backoff)
			if !r.waitBackoff(c, backoff, "CreateContainerError", err.Error()) {
				return false
			}
			continue
		}
		select {
		case <-p.exited:
		case <-r.ctx.Done():
			p.stop(r.grace())
			r.recordExit(c, p)
			return false
		}
		if r.recordExit(c, p) == 0 {
			r.mu.Lock()
			c.ready = true
			r.mu.Unlock()
			return true
		}
		if r.pod.Spec.RestartPolicy == corev1.RestartPolicyNever {
			r.mu.Lock()
			r.failed = true
			r.mu.Unlock()
			r.notify()
			<-r.ctx.Done()
			return false
		}
		backoff = nextBackoff(backoff)
		if !r.waitBackoff(c, backoff, "CrashLoopBackOff", fmt.Sprintf("back-off %s restarting failed container %s", backoff, c.spec.Name)) {
			return false
		}
		r.mu.Lock()
		c.status.RestartCount++
		r.mu.Unlock()
	}
}

func (r *podRuntime) grace() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pod.DeletionGracePeriodSeconds != nil {
		return time.Duration(*r.pod.DeletionGracePeriodSeconds) * time.Second
	}
	if r.pod.Spec.TerminationGracePeriodSeconds != nil {
		return time.Duration(*r.pod.Spec.TerminationGracePeriodSeconds) * time.Second
	}
	return 30 * time.Second
}

// supervise runs an app container with its probes and restarts it per restartPolicy.
func (r *podRuntime) supervise(c *containerRuntime) {
	var backoff time.Duration
	for {
		p, err := r.startInstance(c)
		if err != nil {
			r.event(true, "Failed", "container %s: %v", c.spec.Name, err)
			backoff = nextBackoff(backoff)
			if !r.waitBackoff(c, backoff, "CreateContainerError", err.Error()) {
				return
			}
			continue
		}
		pctx, pcancel := context.WithCancel(r.ctx)
		go r.probe(pctx, c, p)
		killed := false
		select {
		case <-p.exited:
		case <-c.kill:
			killed = true
			p.stop(r.probeGrace(c))
		case <-r.ctx.Done():
			pcancel()
			p.stop(r.grace())
			r.recordExit(c, p)
			return
		}
		pcancel()
		code := r.recordExit(c, p)
		if r.ctx.Err() != nil {
			return
		}
		policy := r.pod.Spec.RestartPolicy
		// A container killed by a failing liveness probe counts as failed.
		if policy == corev1.RestartPolicyNever || (policy == corev1.RestartPolicyOnFailure && code == 0 && !killed) {
			return
		}
		if time.Since(p.started) > 10*time.Minute {
			backoff = 0
		}
		backoff = nextBackoff(backoff)
		r.event(true, "BackOff", "Back-off %s restarting failed container %s (exit code %d)", backoff, c.spec.Name, code)
		if !r.waitBackoff(c, backoff, "CrashLoopBackOff", fmt.Sprintf("back-off %s restarting failed container=%s pod=%s", backoff, c.spec.Name, r.pod.Name)) {
			return
		}
		r.mu.Lock()
		c.status.RestartCount++
		r.mu.Unlock()
	}
}

func (r *podRuntime) probeGrace(c *containerRuntime) time.Duration {
	if lp := c.spec.LivenessProbe; lp != nil && lp.TerminationGracePeriodSeconds != nil {
		return time.Duration(*lp.TerminationGracePeriodSeconds) * time.Second
	}
	return r.grace()
}

// terminate starts the graceful stop of every container (deletion).
func (r *podRuntime) terminate(pod *corev1.Pod) {
	r.mu.Lock()
	r.pod = pod.DeepCopy()
	already := r.terminating
	r.terminating = true
	r.mu.Unlock()
	if !already {
		r.event(false, "Killing", "Stopping the pod's containers (grace period %s)", r.grace())
		r.cancel()
	}
}

// update takes a new version of the pod object (labels, deletion fields).
func (r *podRuntime) update(pod *corev1.Pod) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.terminating {
		return
	}
	r.pod = pod.DeepCopy()
}

// teardown waits for the processes, releases the sandbox and, if the pod is being deleted,
// removes the object (what the kubelet's status manager does once nothing runs).
func (r *podRuntime) teardown() {
	<-r.ctx.Done()
	killNetnsProcesses(nsPath(string(r.uid)))
	r.a.net.release(context.Background(), string(r.uid))
	r.pushStatus(context.Background())
	r.mu.Lock()
	pod := r.pod
	deleting := r.pod.DeletionTimestamp != nil
	r.mu.Unlock()
	if deleting {
		r.a.deletePodObject(context.Background(), pod)
	}
	_ = os.RemoveAll(r.dir)
	r.a.forget(r.uid)
}

// statusLoop writes the status whenever something changed.
func (r *podRuntime) statusLoop() {
	for {
		select {
		case <-r.done:
			return
		case <-r.dirty:
		}
		time.Sleep(50 * time.Millisecond)
		r.pushStatus(r.ctx)
	}
}

func (r *podRuntime) pushStatus(ctx context.Context) {
	if ctx.Err() != nil {
		ctx = context.Background()
	}
	r.mu.Lock()
	st := r.computeStatus(time.Now())
	ns, name, uid := r.pod.Namespace, r.pod.Name, r.pod.UID
	r.mu.Unlock()
	patch := map[string]any{"metadata": map[string]any{"uid": uid}, "status": st}
	raw, err := json.Marshal(patch)
	if err != nil {
		return
	}
	for attempt := 0; attempt < 5; attempt++ {
		_, err = r.a.client.CoreV1().Pods(ns).Patch(ctx, name, types.MergePatchType, raw, metav1.PatchOptions{}, "status")
		if err == nil || apierrors.IsNotFound(err) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	r.logf("writing pod status: %v", err)
}
