package nodeagent

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

func TestPodPhase(t *testing.T) {
	always, never, onFailure := corev1.RestartPolicyAlways, corev1.RestartPolicyNever, corev1.RestartPolicyOnFailure
	cases := []struct {
		name                                string
		policy                              corev1.RestartPolicy
		started, initFailed, terminating    bool
		running, succeeded, failed, waiting int
		want                                corev1.PodPhase
	}{
		{"init containers running", always, false, false, false, 0, 0, 0, 1, corev1.PodPending},
		{"init failed, never", never, false, true, false, 0, 0, 0, 1, corev1.PodFailed},
		{"a container not started", always, true, false, false, 1, 0, 0, 1, corev1.PodPending},
		{"running", always, true, false, false, 2, 0, 0, 0, corev1.PodRunning},
		{"crash looping, always", always, true, false, false, 0, 0, 1, 0, corev1.PodRunning},
		{"helm test passed", never, true, false, false, 0, 1, 0, 0, corev1.PodSucceeded},
		{"helm test failed", never, true, false, false, 0, 0, 1, 0, corev1.PodFailed},
		{"one done, one running", never, true, false, false, 1, 1, 0, 0, corev1.PodRunning},
		{"onFailure restarting", onFailure, true, false, false, 0, 0, 1, 0, corev1.PodRunning},
		{"onFailure done", onFailure, true, false, false, 0, 2, 0, 0, corev1.PodSucceeded},
		{"deleted, exited 0", always, true, false, true, 0, 1, 0, 0, corev1.PodSucceeded},
		{"deleted, killed", always, true, false, true, 0, 0, 1, 0, corev1.PodFailed},
	}
	for _, c := range cases {
		if got := podPhase(c.policy, c.started, c.initFailed, c.terminating, c.running, c.succeeded, c.failed, c.waiting); got != c.want {
			t.Errorf("%s: phase %s, want %s", c.name, got, c.want)
		}
	}
}

func TestHostsFileStatefulSetName(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "warren-rabbitmq-0", Namespace: "default"},
		Spec: corev1.PodSpec{Hostname: "warren-rabbitmq-0", Subdomain: "warren-rabbitmq-headless",
			HostAliases: []corev1.HostAlias{{IP: "10.1.2.3", Hostnames: []string{"a", "b"}}}},
	}
	h := hostsFile(pod, "10.244.0.5", "warren-rabbitmq-0", "cluster.local")
	for _, want := range []string{
		"127.0.0.1\tlocalhost\n",
		"10.244.0.5\twarren-rabbitmq-0.warren-rabbitmq-headless.default.svc.cluster.local\twarren-rabbitmq-0\n",
		"10.1.2.3\ta\tb\n",
	} {
		if !strings.Contains(h, want) {
			t.Errorf("hosts file lacks %q:\n%s", want, h)
		}
	}
}

func TestResolvConf(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns"}}
	got := resolvConf(pod, "10.96.0.10", "cluster.local")
	want := "search ns.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
	if got != want {
		t.Errorf("resolv.conf:\n%s\nwant:\n%s", got, want)
	}
	pod.Spec.DNSPolicy = corev1.DNSNone
	pod.Spec.DNSConfig = &corev1.PodDNSConfig{Nameservers: []string{"1.1.1.1"}, Options: []corev1.PodDNSConfigOption{{Name: "ndots", Value: ptr.To("2")}}}
	got = resolvConf(pod, "10.96.0.10", "cluster.local")
	if got != "nameserver 1.1.1.1\noptions ndots:2\n" {
		t.Errorf("dnsPolicy None: %q", got)
	}
}

func TestProberThresholds(t *testing.T) {
	pr := &prober{p: &corev1.Probe{SuccessThreshold: 1, FailureThreshold: 3}}
	steps := []struct {
		ok, wantRes, wantChanged bool
	}{
		{true, true, true}, {true, true, false}, {false, false, false}, {false, false, false},
		{false, false, true}, {false, false, false}, {true, true, true},
	}
	for i, s := range steps {
		res, changed := pr.observe(s.ok)
		if res != s.wantRes || changed != s.wantChanged {
			t.Errorf("step %d: observe(%v) = %v,%v want %v,%v", i, s.ok, res, changed, s.wantRes, s.wantChanged)
		}
	}
}
