package nodeagent

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func TestContainerLogsEndpoint(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "warren-worker-1", Namespace: "default", UID: "uid-1"},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "worker", Image: "warren-worker:0.1"}}},
	}
	a := &agent{podsDir: t.TempDir(), pods: map[types.UID]*podRuntime{}}
	r := statusRuntime(pod)
	r.a = a
	r.dir = filepath.Join(a.podsDir, string(pod.UID))
	r.logDir = filepath.Join(t.TempDir(), "default_warren-worker-1_uid-1")
	a.pods[pod.UID] = r
	c := r.appC[0]
	c.status.RestartCount = 1
	c.status.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0}}
	for restart, text := range map[int32]string{0: "old 1\nold 2\n", 1: "new 1\nnew 2\nnew 3\n"} {
		p := r.logPath(c, restart)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /containerLogs/{ns}/{pod}/{container}", a.handleLogs)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	get := func(q string) (int, string) {
		resp, err := http.Get(srv.URL + "/containerLogs/default/warren-worker-1/worker" + q)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	cases := []struct {
		q, want string
		code    int
	}{
		{"", "new 1\nnew 2\nnew 3\n", 200},
		{"?tailLines=2", "new 2\nnew 3\n", 200},
		{"?previous=true", "old 1\nold 2\n", 200},
		{"?limitBytes=5", "new 1", 200},
		// follow on a terminated container returns what there is instead of hanging.
		{"?follow=true", "new 1\nnew 2\nnew 3\n", 200},
	}
	for _, c := range cases {
		code, body := get(c.q)
		if code != c.code || body != c.want {
			t.Errorf("logs%s: %d %q, want %d %q", c.q, code, body, c.code, c.want)
		}
	}
	if code, _ := get("/../nope"); code == 200 {
		t.Error("an unknown container must not answer 200")
	}
	resp, err := http.Get(srv.URL + "/containerLogs/default/other-pod/worker")
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("unknown pod: %d", resp.StatusCode)
	}
}
