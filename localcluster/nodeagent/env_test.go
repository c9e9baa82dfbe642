package nodeagent

import (
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
)

type fakeObjects struct {
	cms     map[string]*corev1.ConfigMap
	secrets map[string]*corev1.Secret
}

var errMissing = errors.New("not found")

func (f fakeObjects) ConfigMap(ns, name string) (*corev1.ConfigMap, error) {
	if cm, ok := f.cms[ns+"/"+name]; ok {
		return cm, nil
	}
	return nil, errMissing
}

func (f fakeObjects) Secret(ns, name string) (*corev1.Secret, error) {
	if s, ok := f.secrets[ns+"/"+name]; ok {
		return s, nil
	}
	return nil, errMissing
}

func envMap(kv []string) map[string]string {
	m := map[string]string{}
	for _, s := range kv {
		k, v, _ := strings.Cut(s, "=")
		m[k] = v
	}
	return m
}

func testObjects() fakeObjects {
	return fakeObjects{
		cms: map[string]*corev1.ConfigMap{"ns/cfg": {Data: map[string]string{"mode": "fast", "level": "3"}}},
		secrets: map[string]*corev1.Secret{
			"ns/rabbit": {Data: map[string][]byte{"username": []byte("warren"), "password": []byte("s3cret")}},
		},
	}
}

func TestContainerEnvResolvesReferencesAndExpansion(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "worker-abc", Namespace: "ns", UID: "u-1", Labels: map[string]string{"app": "w"}},
		Spec:       corev1.PodSpec{NodeName: "local-node", ServiceAccountName: "sa"},
	}
	c := &corev1.Container{
		EnvFrom: []corev1.EnvFromSource{{Prefix: "CFG_", ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}}},
		Env: []corev1.EnvVar{
			{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
			{Name: "POD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
			{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
			{Name: "APP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels['app']"}}},
			{Name: "USER", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "rabbit"}, Key: "username"}}},
			{Name: "PASS", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "rabbit"}, Key: "password"}}},
			{Name: "MODE", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}, Key: "mode"}}},
			{Name: "URL", Value: "amqp://$(USER):$(PASS)@rabbit:5672/%2f?$(UNDEFINED)&$$(ESCAPED)"},
			{Name: "NODENAME", Value: "rabbit@$(POD_NAME).h.$(POD_NAMESPACE).svc"},
			{Name: "OPTIONAL", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "absent"}, Key: "k", Optional: ptr.To(true)}}},
			{Name: "MEM", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.memory", Divisor: resource.MustParse("1Mi")}}},
		},
		Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")}},
	}
	kv, err := containerEnv(pod, c, map[string]string{"HOME": "/var/lib/x"}, map[string]string{"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, podAddresses{PodIP: "10.244.0.7", HostIP: "10.244.0.1"}, "worker-abc", testObjects())
	if err != nil {
		t.Fatal(err)
	}
	env := envMap(kv)
	want := map[string]string{
		"POD_NAME": "worker-abc", "POD_NAMESPACE": "ns", "POD_IP": "10.244.0.7", "APP": "w",
		"USER": "warren", "PASS": "s3cret", "MODE": "fast", "CFG_mode": "fast", "CFG_level": "3",
		"URL":      "amqp://warren:s3cret@rabbit:5672/%2f?$(UNDEFINED)&$(ESCAPED)",
		"NODENAME": "rabbit@worker-abc.h.ns.svc", "HOME": "/var/lib/x", "HOSTNAME": "worker-abc",
		"KUBERNETES_SERVICE_HOST": "10.96.0.1", "MEM": "64", "PATH": defaultPath,
	}
	for k, v := range want {
		if env[k] != v {
			t.Errorf("%s = %q, want %q", k, env[k], v)
		}
	}
	if _, ok := env["OPTIONAL"]; ok {
		t.Error("an optional reference to a missing secret must leave the variable unset")
	}
}

func TestContainerEnvMissingReferenceFails(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns"}}
	for name, ev := range map[string]corev1.EnvVar{
		"missing secret": {Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "nope"}, Key: "k"}}},
		"missing key":    {Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "rabbit"}, Key: "nope"}}},
		"missing cm key": {Name: "X", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}, Key: "nope"}}},
		"bad fieldPath":  {Name: "X", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.bogus"}}},
	} {
		if _, err := containerEnv(pod, &corev1.Container{Env: []corev1.EnvVar{ev}}, nil, nil, podAddresses{}, "p", testObjects()); err == nil {
			t.Errorf("%s: expected an error", name)
		}
	}
}

func TestServiceEnv(t *testing.T) {
	svc := func(ns, name, ip string, ports ...corev1.ServicePort) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: corev1.ServiceSpec{ClusterIP: ip, Ports: ports}}
	}
	services := []*corev1.Service{
		svc("default", "kubernetes", "10.96.0.1", corev1.ServicePort{Name: "https", Port: 443}),
		svc("ns", "warren-sender", "10.96.3.4", corev1.ServicePort{Name: "http", Port: 80}),
		svc("ns", "warren-rabbitmq-headless", "None", corev1.ServicePort{Name: "amqp", Port: 5672}),
		svc("other", "elsewhere", "10.96.9.9", corev1.ServicePort{Port: 1}),
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns"}}
	env := serviceEnv(pod, services)
	for k, v := range map[string]string{
		"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443", "KUBERNETES_SERVICE_PORT_HTTPS": "443",
		"WARREN_SENDER_SERVICE_HOST": "10.96.3.4", "WARREN_SENDER_SERVICE_PORT": "80", "WARREN_SENDER_PORT": "tcp://10.96.3.4:80",
		"WARREN_SENDER_PORT_80_TCP_ADDR": "10.96.3.4",
	} {
		if env[k] != v {
			t.Errorf("%s = %q, want %q", k, env[k], v)
		}
	}
	for _, k := range []string{"ELSEWHERE_SERVICE_HOST", "WARREN_RABBITMQ_HEADLESS_SERVICE_HOST"} {
		if _, ok := env[k]; ok {
			t.Errorf("%s must not be set", k)
		}
	}
	pod.Spec.EnableServiceLinks = ptr.To(false)
	env = serviceEnv(pod, services)
	if _, ok := env["WARREN_SENDER_SERVICE_HOST"]; ok || env["KUBERNETES_SERVICE_HOST"] != "10.96.0.1" {
		t.Errorf("enableServiceLinks=false keeps only the master service: %v", env)
	}
}
