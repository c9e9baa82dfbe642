package nodeagent

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	remotecommandconsts "k8s.io/apimachinery/pkg/util/remotecommand"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/klog/v2"
	"k8s.io/kubelet/pkg/cri/streaming/portforward"
	remotecommandserver "k8s.io/kubelet/pkg/cri/streaming/remotecommand"
)

// serveKubeletAPI serves the part of the kubelet API the apiserver proxies to: container logs,
// exec and port-forward, over TLS with the cluster CA's serving certificate, accepting clients
// whose certificate the cluster CA signed (the apiserver's kubelet client).
func (a *agent) serveKubeletAPI(ctx context.Context) error {
	cert, err := tls.LoadX509KeyPair(a.cfg.KubeletCert, a.cfg.KubeletKey)
	if err != nil {
		return fmt.Errorf("kubelet serving certificate: %w", err)
	}
	caPEM, err := os.ReadFile(a.cfg.ClientCA)
	if err != nil {
		return fmt.Errorf("kubelet client CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return errors.New("kubelet client CA: no certificate found")
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	mux.HandleFunc("GET /containerLogs/{ns}/{pod}/{container}", a.handleLogs)
	mux.HandleFunc("/portForward/{ns}/{pod}", a.handlePortForward)
	mux.HandleFunc("/portForward/{ns}/{pod}/{uid}", a.handlePortForward)
	mux.HandleFunc("/exec/{ns}/{pod}/{container}", a.handleExec)
	mux.HandleFunc("/exec/{ns}/{pod}/{uid}/{container}", a.handleExec)
	srv := &http.Server{
		Addr:              net.JoinHostPort(a.cfg.NodeIP, strconv.Itoa(a.cfg.KubeletPort)),
		Handler:           mux,
		ReadHeaderTimeout: 30 * time.Second,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert},
			ClientCAs:    pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
			MinVersion:   tls.VersionTLS12,
		},
	}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	if err := srv.ListenAndServeTLS("", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("kubelet API: %w", err)
	}
	return nil
}

func (r *podRuntime) container(name string) (*containerRuntime, error) {
	for _, c := range append(append([]*containerRuntime{}, r.appC...), r.initC...) {
		if c.spec.Name == name {
			return c, nil
		}
	}
	return nil, fmt.Errorf("container %q is not in pod %s/%s", name, r.pod.Namespace, r.pod.Name)
}

func (a *agent) handleLogs(w http.ResponseWriter, req *http.Request) {
	r, err := a.podByName(req.PathValue("ns"), req.PathValue("pod"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	c, err := r.container(req.PathValue("container"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	q := req.URL.Query()
	r.mu.Lock()
	restart := c.status.RestartCount
	running := c.status.State.Running != nil
	r.mu.Unlock()
	if q.Get("previous") == "true" {
		if restart == 0 {
			http.Error(w, fmt.Sprintf("previous terminated container %q in pod %q not found", c.spec.Name, r.pod.Name), http.StatusBadRequest)
			return
		}
		restart--
		running = false
	}
	f, err := os.Open(r.logPath(c, restart))
	if err != nil {
		http.Error(w, fmt.Sprintf("container %q in pod %q has no logs yet", c.spec.Name, r.pod.Name), http.StatusBadRequest)
		return
	}
	defer f.Close()
	var limit int64 = -1
	if v := q.Get("limitBytes"); v != "" {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			limit = n
		}
	}
	if v := q.Get("tailLines"); v != "" {
		if n, err := strconv.Atoi(v); err == nil {
			if err := seekTail(f, n); err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
		}
	}
	w.Header().Set("Content-Type", "text/plain")
	var out io.Writer = w
	if limit >= 0 {
		out = &limitWriter{w: w, left: limit}
	}
	follow := q.Get("follow") == "true" && running
	flusher, _ := w.(http.Flusher)
	for {
		n, err := io.Copy(out, f)
		if err != nil {
			return
		}
		if lw, ok := out.(*limitWriter); ok && lw.left <= 0 {
			return
		}
		if !follow {
			return
		}
		if n > 0 && flusher != nil {
			flusher.Flush()
		}
		r.mu.Lock()
		stillSame := c.status.RestartCount == restart && c.status.State.Running != nil
		r.mu.Unlock()
		if !stillSame {
			_, _ = io.Copy(out, f)
			return
		}
		select {
		case <-req.Context().Done():
			return
		case <-time.After(300 * time.Millisecond):
		}
	}
}

// seekTail positions f at the start of its last n lines.
func seekTail(f *os.File, n int) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if n <= 0 {
		_, err := f.Seek(0, io.SeekEnd)
		return err
	}
	size := st.Size()
	const chunk = 8192
	var buf []byte
	pos := size
	for pos > 0 {
		read := int64(chunk)
		if pos < read {
			read = pos
		}
		pos -= read
		b := make([]byte, read)
		if _, err := f.ReadAt(b, pos); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		buf = append(b, buf...)
		trimmed := bytes.TrimSuffix(buf, []byte("\n"))
		if bytes.Count(trimmed, []byte("\n")) >= n {
			break
		}
	}
	trimmed := bytes.TrimSuffix(buf, []byte("\n"))
	idx := len(trimmed)
	for i := 0; i < n; i++ {
		j := bytes.LastIndexByte(trimmed[:idx], '\n')
		if j < 0 {
			idx = -1
			break
		}
		idx = j
	}
	_, err = f.Seek(pos+int64(idx+1), io.SeekStart)
	return err
}

type limitWriter struct {
	w    io.Writer
	left int64
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if l.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.w.Write(p)
	l.left -= int64(n)
	return n, err
}

// portForwarder connects port-forward streams to localhost:port inside the pod's network
// namespace, as the kubelet's runtime does.
type portForwarder struct{ a *agent }

func (p portForwarder) PortForward(ctx context.Context, name string, uid types.UID, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	p.a.mu.Lock()
	r, ok := p.a.pods[uid]
	p.a.mu.Unlock()
	if !ok {
		return fmt.Errorf("pod %s is not running here", name)
	}
	var conn net.Conn
	err := inNetns(nsPath(string(r.uid)), func() error {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
		conn = c
		return err
	})
	if err != nil {
		return fmt.Errorf("port-forward to %s port %d: %w", name, port, err)
	}
	defer conn.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(conn, stream); done <- struct{}{} }()
	go func() { _, _ = io.Copy(stream, conn); done <- struct{}{} }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	return nil
}

func (a *agent) handlePortForward(w http.ResponseWriter, req *http.Request) {
	r, err := a.podByName(req.PathValue("ns"), req.PathValue("pod"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	opts, err := portforward.NewV4Options(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	portforward.ServePortForward(w, req, portForwarder{a: a}, r.pod.Name, r.uid, opts,
		4*time.Hour, remotecommandconsts.DefaultStreamCreationTimeout, portforward.SupportedProtocols)
}

// executor runs kubectl exec commands in a container's namespaces.
type executor struct{ r *podRuntime }

func (e executor) ExecInContainer(ctx context.Context, _ string, _ types.UID, container string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, _ <-chan remotecommand.TerminalSize, timeout time.Duration) error {
	c, err := e.r.container(container)
	if err != nil {
		return err
	}
	e.r.mu.Lock()
	p := c.proc
	launch := c.launch
	running := c.status.State.Running != nil
	e.r.mu.Unlock()
	if p == nil || !running {
		return fmt.Errorf("container %s is not running", container)
	}
	if tty {
		return errors.New("tty is not supported by the localcluster node agent (use kubectl exec without -t)")
	}
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	var stdout, stderr io.Writer = io.Discard, io.Discard
	if out != nil {
		stdout = out
	}
	if errw != nil {
		stderr = errw
	}
	var stdin io.Reader
	if in != nil {
		stdin = bufio.NewReader(in)
	}
	code, err := execInContainer(ctx, p.pid, launch.UID, launch.GID, launch.Env, launch.WorkingDir, cmd, stdin, stdout, stderr)
	if err != nil {
		return err
	}
	if code != 0 {
		return exitError{code: code}
	}
	return nil
}

// exitError carries a command's exit code back to kubectl.
type exitError struct{ code int }

func (e exitError) Error() string {
	return fmt.Sprintf("command terminated with non-zero exit code: %d", e.code)
}
func (e exitError) String() string  { return e.Error() }
func (e exitError) Exited() bool    { return true }
func (e exitError) ExitStatus() int { return e.code }

func (a *agent) handleExec(w http.ResponseWriter, req *http.Request) {
	r, err := a.podByName(req.PathValue("ns"), req.PathValue("pod"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	opts, err := remotecommandserver.NewOptions(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	cmd := req.URL.Query()[corev1.ExecCommandParam]
	klog.V(2).InfoS("exec", "pod", klog.KObj(r.pod), "container", req.PathValue("container"), "command", cmd)
	remotecommandserver.ServeExec(w, req, executor{r: r}, r.pod.Name, r.uid, req.PathValue("container"), cmd, opts,
		4*time.Hour, remotecommandconsts.DefaultStreamCreationTimeout, remotecommandconsts.SupportedStreamingProtocols)
}
