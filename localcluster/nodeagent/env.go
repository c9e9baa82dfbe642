package nodeagent

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"warren.dev/localcluster/internal/containerinit"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/kubernetes/third_party/forked/golang/expansion"
)

// objectSource gives the env/volume code the objects a pod refers to.
type objectSource interface {
	ConfigMap(namespace, name string) (*corev1.ConfigMap, error)
	Secret(namespace, name string) (*corev1.Secret, error)
}

// podAddresses are the runtime fields the downward API may expose.
type podAddresses struct {
	PodIP, HostIP string
}

const defaultPath = containerinit.DefaultPath

// serviceEnv builds the Docker-links style variables the kubelet injects for the services of
// the pod's namespace (enableServiceLinks) plus the master service in "default", which every pod
// gets (KUBERNETES_SERVICE_HOST/PORT, what in-cluster clients read).
func serviceEnv(pod *corev1.Pod, services []*corev1.Service) map[string]string {
	out := map[string]string{}
	links := pod.Spec.EnableServiceLinks == nil || *pod.Spec.EnableServiceLinks
	sorted := append([]*corev1.Service{}, services...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
	for _, s := range sorted {
		if s.Spec.ClusterIP == "" || s.Spec.ClusterIP == corev1.ClusterIPNone {
			continue
		}
		master := s.Namespace == "default" && s.Name == "kubernetes"
		if s.Namespace != pod.Namespace && !master {
			continue
		}
		if s.Namespace == pod.Namespace && !links && !master {
			continue
		}
		prefix := strings.ToUpper(strings.ReplaceAll(s.Name, "-", "_"))
		if len(s.Spec.Ports) == 0 {
			continue
		}
		out[prefix+"_SERVICE_HOST"] = s.Spec.ClusterIP
		out[prefix+"_SERVICE_PORT"] = strconv.Itoa(int(s.Spec.Ports[0].Port))
		for _, p := range s.Spec.Ports {
			if p.Name != "" {
				out[prefix+"_SERVICE_PORT_"+strings.ToUpper(strings.ReplaceAll(p.Name, "-", "_"))] = strconv.Itoa(int(p.Port))
			}
		}
		first := s.Spec.Ports[0]
		out[prefix+"_PORT"] = fmt.Sprintf("%s://%s:%d", strings.ToLower(string(protocolOf(first))), s.Spec.ClusterIP, first.Port)
		for _, p := range s.Spec.Ports {
			proto := string(protocolOf(p))
			base := fmt.Sprintf("%s_PORT_%d_%s", prefix, p.Port, strings.ToUpper(proto))
			out[base] = fmt.Sprintf("%s://%s:%d", strings.ToLower(proto), s.Spec.ClusterIP, p.Port)
			out[base+"_PROTO"] = strings.ToLower(proto)
			out[base+"_PORT"] = strconv.Itoa(int(p.Port))
			out[base+"_ADDR"] = s.Spec.ClusterIP
		}
	}
	return out
}

func protocolOf(p corev1.ServicePort) corev1.Protocol {
	if p.Protocol == "" {
		return corev1.ProtocolTCP
	}
	return p.Protocol
}

// containerEnv resolves a container's environment the way the kubelet does: image env, then
// service variables, then envFrom, then env (later wins), with $(VAR) expansion of env values
// against what is defined before them. It returns KEY=VALUE pairs, sorted.
func containerEnv(pod *corev1.Pod, c *corev1.Container, image map[string]string, services map[string]string, addr podAddresses, hostname string, src objectSource) ([]string, error) {
	env := map[string]string{"PATH": defaultPath, "HOSTNAME": hostname, "HOME": "/"}
	for k, v := range image {
		env[k] = v
	}
	for k, v := range services {
		env[k] = v
	}
	for _, from := range c.EnvFrom {
		switch {
		case from.ConfigMapRef != nil:
			cm, err := src.ConfigMap(pod.Namespace, from.ConfigMapRef.Name)
			if err != nil {
				if from.ConfigMapRef.Optional != nil && *from.ConfigMapRef.Optional {
					continue
				}
				return nil, fmt.Errorf("envFrom configMap %q: %w", from.ConfigMapRef.Name, err)
			}
			for k, v := range cm.Data {
				env[from.Prefix+k] = v
			}
		case from.SecretRef != nil:
			s, err := src.Secret(pod.Namespace, from.SecretRef.Name)
			if err != nil {
				if from.SecretRef.Optional != nil && *from.SecretRef.Optional {
					continue
				}
				return nil, fmt.Errorf("envFrom secret %q: %w", from.SecretRef.Name, err)
			}
			for k, v := range s.Data {
				env[from.Prefix+k] = string(v)
			}
		}
	}
	mapping := expansion.MappingFuncFor(env)
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			env[e.Name] = expansion.Expand(e.Value, mapping)
			continue
		}
		v, ok, err := envValueFrom(pod, c, e.ValueFrom, addr, src)
		if err != nil {
			return nil, fmt.Errorf("env %s: %w", e.Name, err)
		}
		if ok {
			env[e.Name] = v
		}
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out, nil
}

func envValueFrom(pod *corev1.Pod, c *corev1.Container, from *corev1.EnvVarSource, addr podAddresses, src objectSource) (string, bool, error) {
	switch {
	case from.FieldRef != nil:
		v, err := podField(pod, from.FieldRef.FieldPath, addr)
		return v, err == nil, err
	case from.ResourceFieldRef != nil:
		v, err := resourceField(c, from.ResourceFieldRef)
		return v, err == nil, err
	case from.ConfigMapKeyRef != nil:
		ref := from.ConfigMapKeyRef
		optional := ref.Optional != nil && *ref.Optional
		cm, err := src.ConfigMap(pod.Namespace, ref.Name)
		if err != nil {
			if optional {
				return "", false, nil
			}
			return "", false, fmt.Errorf("configMap %q: %w", ref.Name, err)
		}
		v, found := cm.Data[ref.Key]
		if !found {
			if b, bin := cm.BinaryData[ref.Key]; bin {
				return string(b), true, nil
			}
			if optional {
				return "", false, nil
			}
			return "", false, fmt.Errorf("configMap %q has no key %q", ref.Name, ref.Key)
		}
		return v, true, nil
	case from.SecretKeyRef != nil:
		ref := from.SecretKeyRef
		optional := ref.Optional != nil && *ref.Optional
		s, err := src.Secret(pod.Namespace, ref.Name)
		if err != nil {
			if optional {
				return "", false, nil
			}
			return "", false, fmt.Errorf("secret %q: %w", ref.Name, err)
		}
		v, found := s.Data[ref.Key]
		if !found {
			if optional {
				return "", false, nil
			}
			return "", false, fmt.Errorf("secret %q has no key %q", ref.Name, ref.Key)
		}
		return string(v), true, nil
	}
	return "", false, fmt.Errorf("unsupported valueFrom")
}

// podField answers a downward-API fieldPath.
func podField(pod *corev1.Pod, path string, addr podAddresses) (string, error) {
	if strings.HasPrefix(path, "metadata.labels['") && strings.HasSuffix(path, "']") {
		return pod.Labels[strings.TrimSuffix(strings.TrimPrefix(path, "metadata.labels['"), "']")], nil
	}
	if strings.HasPrefix(path, "metadata.annotations['") && strings.HasSuffix(path, "']") {
		return pod.Annotations[strings.TrimSuffix(strings.TrimPrefix(path, "metadata.annotations['"), "']")], nil
	}
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		return formatMap(pod.Labels), nil
	case "metadata.annotations":
		return formatMap(pod.Annotations), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.hostIP", "status.hostIPs":
		return addr.HostIP, nil
	case "status.podIP", "status.podIPs":
		return addr.PodIP, nil
	}
	return "", fmt.Errorf("unsupported fieldPath %q", path)
}

func formatMap(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	lines := make([]string, 0, len(keys))
	for _, k := range keys {
		lines = append(lines, fmt.Sprintf("%s=%q", k, m[k]))
	}
	return strings.Join(lines, "\n")
}

// resourceField answers a resourceFieldRef: limits fall back to the node's capacity like the
// kubelet does when a container sets none (here: the node agent's advertised capacity).
func resourceField(c *corev1.Container, ref *corev1.ResourceFieldSelector) (string, error) {
	divisor := ref.Divisor
	if divisor.IsZero() {
		divisor = resource.MustParse("1")
	}
	var q resource.Quantity
	var ok bool
	switch ref.Resource {
	case "limits.cpu":
		q, ok = c.Resources.Limits[corev1.ResourceCPU]
		if !ok {
			q = nodeCapacity()[corev1.ResourceCPU]
		}
		return strconv.FormatInt(int64(math.Ceil(float64(q.MilliValue())/float64(divisor.MilliValue()))), 10), nil
	case "requests.cpu":
		q = c.Resources.Requests[corev1.ResourceCPU]
		return strconv.FormatInt(int64(math.Ceil(float64(q.MilliValue())/float64(divisor.MilliValue()))), 10), nil
	case "limits.memory":
		q, ok = c.Resources.Limits[corev1.ResourceMemory]
		if !ok {
			q = nodeCapacity()[corev1.ResourceMemory]
		}
	case "requests.memory":
		q = c.Resources.Requests[corev1.ResourceMemory]
	case "limits.ephemeral-storage":
		q = c.Resources.Limits[corev1.ResourceEphemeralStorage]
	case "requests.ephemeral-storage":
		q = c.Resources.Requests[corev1.ResourceEphemeralStorage]
	default:
		return "", fmt.Errorf("unsupported resource %q", ref.Resource)
	}
	return strconv.FormatInt(int64(math.Ceil(float64(q.Value())/float64(divisor.Value()))), 10), nil
}
