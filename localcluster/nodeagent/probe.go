package nodeagent

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// resolvePort turns a probe's port (number or container port name) into a number.
func resolvePort(p intstr.IntOrString, c *corev1.Container) (int, error) {
	if p.Type == intstr.Int {
		return p.IntValue(), nil
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil {
		return n, nil
	}
	return 0, fmt.Errorf("container %s has no port named %q", c.Name, p.StrVal)
}

// probeTarget is what a probe needs to know about the running instance.
type probeTarget struct {
	podIP string
	pid   int
	uid   int64
	gid   int64
	env   []string
	wd    string
}

// runProbe performs one probe: HTTP and TCP from the host to the pod IP (as the kubelet does),
// exec inside the container's namespaces.
func runProbe(ctx context.Context, p *corev1.Probe, c *corev1.Container, t probeTarget) (bool, string) {
	timeout := time.Duration(p.TimeoutSeconds) * time.Second
	if timeout <= 0 {
		timeout = time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch {
	case p.HTTPGet != nil:
		port, err := resolvePort(p.HTTPGet.Port, c)
		if err != nil {
			return false, err.Error()
		}
		host := p.HTTPGet.Host
		if host == "" {
			host = t.podIP
		}
		scheme := "http"
		if p.HTTPGet.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		u := url.URL{Scheme: scheme, Host: net.JoinHostPort(host, strconv.Itoa(port)), Path: p.HTTPGet.Path}
		if u.Path == "" {
			u.Path = "/"
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			return false, err.Error()
		}
		req.Header.Set("User-Agent", "kube-probe/1.34")
		for _, h := range p.HTTPGet.HTTPHeaders {
			req.Header.Set(h.Name, h.Value)
		}
		client := &http.Client{
			Transport:     &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true}, //nolint:gosec // the kubelet does not verify probe certificates either
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
		resp, err := client.Do(req)
		if err != nil {
			return false, err.Error()
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 10<<10))
		_ = resp.Body.Close()
		if resp.StatusCode >= 200 && resp.StatusCode < 400 {
			return true, ""
		}
		return false, fmt.Sprintf("HTTP probe failed with statuscode: %d", resp.StatusCode)
	case p.TCPSocket != nil:
		port, err := resolvePort(p.TCPSocket.Port, c)
		if err != nil {
			return false, err.Error()
		}
		host := p.TCPSocket.Host
		if host == "" {
			host = t.podIP
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return false, err.Error()
		}
		_ = conn.Close()
		return true, ""
	case p.Exec != nil:
		var out limitedBuffer
		code, err := execInContainer(ctx, t.pid, t.uid, t.gid, t.env, t.wd, p.Exec.Command, nil, &out, &out)
		if err != nil {
			return false, err.Error()
		}
		if ctx.Err() != nil {
			return false, "command timed out"
		}
		return code == 0, out.String()
	case p.GRPC != nil:
		return false, "gRPC probes are not supported by the localcluster node agent"
	}
	return false, "probe has no handler"
}

type limitedBuffer struct{ b []byte }

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := 4096 - len(l.b); room > 0 {
		if len(p) < room {
			room = len(p)
		}
		l.b = append(l.b, p[:room]...)
	}
	return len(p), nil
}

func (l *limitedBuffer) String() string { return string(l.b) }

// prober tracks consecutive results against a probe's thresholds.
type prober struct {
	p                   *corev1.Probe
	successes, failures int32
}

func (pr *prober) observe(ok bool) (result, changed bool) {
	success := pr.p.SuccessThreshold
	if success <= 0 {
		success = 1
	}
	fail := pr.p.FailureThreshold
	if fail <= 0 {
		fail = 3
	}
	if ok {
		pr.failures = 0
		pr.successes++
		return true, pr.successes == success
	}
	pr.successes = 0
	pr.failures++
	return false, pr.failures == fail
}

func period(p *corev1.Probe) time.Duration {
	if p.PeriodSeconds <= 0 {
		return 10 * time.Second
	}
	return time.Duration(p.PeriodSeconds) * time.Second
}

// probe runs the container's startup, then readiness and liveness probes until ctx ends.
func (r *podRuntime) probe(ctx context.Context, c *containerRuntime, p *process) {
	r.mu.Lock()
	t := probeTarget{podIP: r.ip.String(), pid: p.pid, uid: c.launch.UID, gid: c.launch.GID, env: c.launch.Env, wd: c.launch.WorkingDir}
	r.mu.Unlock()
	spec := c.spec
	sleep := func(d time.Duration) bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(d):
			return true
		}
	}
	if sp := spec.StartupProbe; sp != nil {
		if !sleep(time.Duration(sp.InitialDelaySeconds) * time.Second) {
			return
		}
		pr := &prober{p: sp}
		for {
			ok, msg := runProbe(ctx, sp, &spec, t)
			if ctx.Err() != nil {
				return
			}
			res, changed := pr.observe(ok)
			if res && changed {
				break
			}
			if !res && changed {
				r.event(true, "Unhealthy", "Startup probe of %s failed: %s; restarting it", spec.Name, msg)
				select {
				case c.kill <- struct{}{}:
				default:
				}
				return
			}
			if !sleep(period(sp)) {
				return
			}
		}
	}
	r.mu.Lock()
	c.started = true
	if spec.ReadinessProbe == nil {
		c.ready = true
	}
	r.mu.Unlock()
	r.notify()
	if lp := spec.LivenessProbe; lp != nil {
		go func() {
			if !sleep(time.Duration(lp.InitialDelaySeconds) * time.Second) {
				return
			}
			pr := &prober{p: lp}
			for {
				ok, msg := runProbe(ctx, lp, &spec, t)
				if ctx.Err() != nil {
					return
				}
				if res, changed := pr.observe(ok); !res && changed {
					r.event(true, "Unhealthy", "Liveness probe of %s failed: %s; restarting it", spec.Name, msg)
					select {
					case c.kill <- struct{}{}:
					default:
					}
					return
				}
				if !sleep(period(lp)) {
					return
				}
			}
		}()
	}
	if rp := spec.ReadinessProbe; rp != nil {
		if !sleep(time.Duration(rp.InitialDelaySeconds) * time.Second) {
			return
		}
		pr := &prober{p: rp}
		for {
			ok, msg := runProbe(ctx, rp, &spec, t)
			if ctx.Err() != nil {
				return
			}
			if res, changed := pr.observe(ok); changed {
				r.mu.Lock()
				c.ready = res
				r.mu.Unlock()
				r.notify()
				if !res {
					r.event(true, "Unhealthy", "Readiness probe of %s failed: %s", spec.Name, msg)
				}
			}
			if !sleep(period(rp)) {
				return
			}
		}
	}
}
