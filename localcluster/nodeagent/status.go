package nodeagent

import (
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// computeStatus builds the pod status from the runtime state (r.mu held).
func (r *podRuntime) computeStatus(now time.Time) corev1.PodStatus {
	st := corev1.PodStatus{
		HostIP:    r.a.cfg.NodeIP,
		HostIPs:   []corev1.HostIP{{IP: r.a.cfg.NodeIP}},
		StartTime: &r.startTime,
		QOSClass:  r.pod.Status.QOSClass,
		// What the kubelet reports with PodObservedGenerationTracking (on by default in 1.34).
		ObservedGeneration: r.pod.Generation,
	}
	if r.ip.IsValid() {
		st.PodIP = r.ip.String()
		st.PodIPs = []corev1.PodIP{{IP: st.PodIP}}
	}
	for _, c := range r.initC {
		cs := c.status
		cs.Ready = c.ready
		cs.Started = boolPtr(cs.State.Running != nil)
		st.InitContainerStatuses = append(st.InitContainerStatuses, cs)
	}
	allReady := len(r.appC) > 0
	running, succeeded, failed, waiting := 0, 0, 0, 0
	for _, c := range r.appC {
		cs := c.status
		if !r.initialized && cs.State.Waiting != nil && r.sandboxErr == "" {
			cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: "PodInitializing"}
		}
		if r.sandboxErr != "" && cs.State.Waiting != nil {
			cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ContainerCreating", Message: r.sandboxErr}
		}
		cs.Ready = c.ready && cs.State.Running != nil
		cs.Started = boolPtr(c.started && cs.State.Running != nil)
		if !cs.Ready {
			allReady = false
		}
		switch {
		case cs.State.Running != nil:
			running++
		case cs.State.Terminated != nil && cs.State.Terminated.ExitCode == 0:
			succeeded++
		case cs.State.Terminated != nil:
			failed++
		case cs.LastTerminationState.Terminated != nil && cs.LastTerminationState.Terminated.ExitCode == 0:
			succeeded++
		case cs.LastTerminationState.Terminated != nil:
			failed++
		default:
			waiting++
		}
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
	}
	st.Phase = podPhase(r.pod.Spec.RestartPolicy, r.started, r.failed, r.terminating, running, succeeded, failed, waiting)

	initialized := r.initialized || r.failed
	conds := []struct {
		t  corev1.PodConditionType
		ok bool
	}{
		{corev1.PodReadyToStartContainers, r.ip.IsValid() && r.sandboxErr == ""},
		{corev1.PodInitialized, initialized && !r.failed},
		{corev1.ContainersReady, allReady},
		{corev1.PodReady, allReady},
	}
	if st.Phase == corev1.PodSucceeded || st.Phase == corev1.PodFailed {
		conds[2].ok, conds[3].ok = false, false
	}
	for _, c := range conds {
		status := corev1.ConditionFalse
		if c.ok {
			status = corev1.ConditionTrue
		}
		if prev, seen := r.lastCond[c.t]; !seen || prev != status {
			r.lastCond[c.t] = status
			r.transitions[c.t] = metav1.NewTime(now)
		}
		cond := corev1.PodCondition{Type: c.t, Status: status, LastTransitionTime: r.transitions[c.t]}
		if !c.ok && (c.t == corev1.ContainersReady || c.t == corev1.PodReady) {
			var notReady []string
			for _, cs := range st.ContainerStatuses {
				if !cs.Ready {
					notReady = append(notReady, cs.Name)
				}
			}
			if st.Phase == corev1.PodSucceeded || st.Phase == corev1.PodFailed {
				cond.Reason = "PodCompleted"
			} else {
				cond.Reason = "ContainersNotReady"
				cond.Message = fmt.Sprintf("containers with unready status: [%s]", strings.Join(notReady, " "))
			}
		}
		if !c.ok && c.t == corev1.PodInitialized {
			cond.Reason = "ContainersNotInitialized"
		}
		st.Conditions = append(st.Conditions, cond)
	}
	// Keep the conditions others own (PodScheduled from the scheduler, readiness gates).
	for _, c := range r.pod.Status.Conditions {
		switch c.Type {
		case corev1.PodReadyToStartContainers, corev1.PodInitialized, corev1.ContainersReady, corev1.PodReady:
			continue
		}
		st.Conditions = append(st.Conditions, c)
	}
	return st
}

// podPhase follows the kubelet's getPhase: a container waiting to restart counts as stopped;
// deleted pods end in a terminal phase whatever their restartPolicy.
func podPhase(policy corev1.RestartPolicy, started, initFailed, terminating bool, running, succeeded, failed, waiting int) corev1.PodPhase {
	switch {
	case initFailed:
		return corev1.PodFailed
	case !started || waiting > 0:
		return corev1.PodPending
	case running > 0:
		return corev1.PodRunning
	case terminating:
		if failed > 0 {
			return corev1.PodFailed
		}
		return corev1.PodSucceeded
	case policy == corev1.RestartPolicyAlways:
		return corev1.PodRunning
	case failed > 0 && policy == corev1.RestartPolicyNever:
		return corev1.PodFailed
	case failed > 0:
		return corev1.PodRunning
	}
	return corev1.PodSucceeded
}

func boolPtr(b bool) *bool { return &b }

// hostsFile is the kubelet's managed /etc/hosts.
func hostsFile(pod *corev1.Pod, podIP, hostname, domain string) string {
	var b strings.Builder
	b.WriteString("# Kubernetes-managed hosts file (localcluster node agent).\n")
	b.WriteString("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n")
	if pod.Spec.Subdomain != "" {
		fmt.Fprintf(&b, "%s\t%s.%s.%s.svc.%s\t%s\n", podIP, hostname, pod.Spec.Subdomain, pod.Namespace, domain, hostname)
	} else {
		fmt.Fprintf(&b, "%s\t%s\n", podIP, hostname)
	}
	if len(pod.Spec.HostAliases) > 0 {
		b.WriteString("\n# Entries added by HostAliases.\n")
		for _, ha := range pod.Spec.HostAliases {
			fmt.Fprintf(&b, "%s\t%s\n", ha.IP, strings.Join(ha.Hostnames, "\t"))
		}
	}
	return b.String()
}

// resolvConf is the pod's /etc/resolv.conf for dnsPolicy ClusterFirst (and dnsConfig additions).
func resolvConf(pod *corev1.Pod, dnsIP, domain string) string {
	servers := []string{dnsIP}
	searches := []string{pod.Namespace + ".svc." + domain, "svc." + domain, domain}
	options := []string{"ndots:5"}
	if pod.Spec.DNSPolicy == corev1.DNSNone {
		servers, searches, options = nil, nil, nil
	}
	if dc := pod.Spec.DNSConfig; dc != nil {
		servers = append(servers, dc.Nameservers...)
		searches = append(searches, dc.Searches...)
		for _, o := range dc.Options {
			if o.Value != nil {
				options = append(options, o.Name+":"+*o.Value)
			} else {
				options = append(options, o.Name)
			}
		}
	}
	var b strings.Builder
	if len(searches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(searches, " "))
	}
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	if len(options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(options, " "))
	}
	return b.String()
}
