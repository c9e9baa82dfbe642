package nodeagent

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"
)

func TestImageRepository(t *testing.T) {
	cases := map[string]string{
		"rabbitmq:4.1-management":               "rabbitmq",
		"docker.io/library/rabbitmq:4.1":        "rabbitmq",
		"curlimages/curl:8.13.0":                "curlimages/curl",
		"ghcr.io/acme/warren-sender:0.1.0":      "acme/warren-sender",
		"localhost:5000/warren-worker:dev":      "warren-worker",
		"warren-controller@sha256:abcdef":       "warren-controller",
		"registry:5000/prom/prometheus:v2.53.4": "prom/prometheus",
	}
	for in, want := range cases {
		if got := imageRepository(in); got != want {
			t.Errorf("imageRepository(%q) = %q, want %q", in, got, want)
		}
	}
}

const testMap = `
images:
  - match: warren-sender
    entrypoint: ["${WARREN_BIN_DIR}/warren-sender"]
  - match: rabbitmq
    entrypoint: ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
    env: {HOME: /var/lib/rabbitmq}
    user: {name: rabbitmq, imageUID: 999, imageGID: 999}
  - match: prom/prometheus
    entrypoint: ["/usr/bin/prometheus"]
    cmd: ["--config.file=/etc/prometheus/prometheus.yml"]
`

func TestLookupAndCommandLine(t *testing.T) {
	m, err := parseImageMap([]byte(testMap), func(k string) string {
		if k == "WARREN_BIN_DIR" {
			return "/target/debug"
		}
		return ""
	})
	if err != nil {
		t.Fatal(err)
	}
	e, err := m.Lookup("ghcr.io/acme/warren-sender:1.0")
	if err != nil {
		t.Fatal(err)
	}
	if got := commandLine(e, &corev1.Container{Args: []string{"--x"}}); !reflect.DeepEqual(got, []string{"/target/debug/warren-sender", "--x"}) {
		t.Errorf("entrypoint + args: %v", got)
	}
	p, err := m.Lookup("prom/prometheus:v2")
	if err != nil {
		t.Fatal(err)
	}
	if got := commandLine(p, &corev1.Container{}); !reflect.DeepEqual(got, []string{"/usr/bin/prometheus", "--config.file=/etc/prometheus/prometheus.yml"}) {
		t.Errorf("entrypoint + image cmd: %v", got)
	}
	if got := commandLine(p, &corev1.Container{Args: []string{"--web.listen-address=:9090"}}); !reflect.DeepEqual(got, []string{"/usr/bin/prometheus", "--web.listen-address=:9090"}) {
		t.Errorf("args replace the image cmd: %v", got)
	}
	if got := commandLine(p, &corev1.Container{Command: []string{"sh", "-c"}, Args: []string{"echo hi"}}); !reflect.DeepEqual(got, []string{"sh", "-c", "echo hi"}) {
		t.Errorf("command replaces the entrypoint: %v", got)
	}
	if _, err := m.Lookup("nginx:1.27"); err == nil || !strings.Contains(err.Error(), "nginx") {
		t.Errorf("unknown image: %v", err)
	}
}

func TestParseImageMapRejectsUnknownFields(t *testing.T) {
	if _, err := parseImageMap([]byte("images:\n  - match: x\n    entrypoint: [a]\n    bogus: 1\n"), func(string) string { return "" }); err == nil {
		t.Fatal("an unknown field must be rejected")
	}
	if _, err := parseImageMap([]byte("images:\n  - match: x\n"), func(string) string { return "" }); err == nil {
		t.Fatal("an entry without entrypoint must be rejected")
	}
}

func TestContainerIdentityMapsImageUser(t *testing.T) {
	e := &ImageEntry{User: &ImageUser{Name: "rabbitmq", ImageUID: 999, ImageGID: 999}}
	m, err := newIDMapper(e, func(string) (int64, int64, error) { return 106, 114, nil })
	if err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{Spec: corev1.PodSpec{SecurityContext: &corev1.PodSecurityContext{
		RunAsUser: ptr.To(int64(999)), RunAsGroup: ptr.To(int64(999)), FSGroup: ptr.To(int64(999)), SupplementalGroups: []int64{5},
	}}}
	id := containerIdentity(pod, &corev1.Container{}, m)
	if id.UID != 106 || id.GID != 114 || !reflect.DeepEqual(id.Groups, []int64{114, 5}) {
		t.Errorf("mapped identity: %+v", id)
	}
	// A container-level runAsUser wins over the pod's; ids other than the image's stay.
	id = containerIdentity(pod, &corev1.Container{SecurityContext: &corev1.SecurityContext{RunAsUser: ptr.To(int64(65532))}}, m)
	if id.UID != 65532 || id.GID != 114 {
		t.Errorf("container override: %+v", id)
	}
	// No mapping, no runAsUser: root, like an image without USER.
	id = containerIdentity(&corev1.Pod{}, &corev1.Container{}, idMapper{})
	if id.UID != 0 || id.GID != 0 || len(id.Groups) != 0 {
		t.Errorf("default identity: %+v", id)
	}
}
