package nodeagent

import (
	"context"
	"fmt"
	"runtime"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

// KubeletVersion is what the Node reports (the control plane's version).
var KubeletVersion = "v1.34.4"

const leaseSeconds = 40

// nodeCapacity is large enough for the chart and then some; nothing is enforced.
func nodeCapacity() corev1.ResourceList {
	return corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("32"),
		corev1.ResourceMemory:           resource.MustParse("128Gi"),
		corev1.ResourcePods:             resource.MustParse("250"),
		corev1.ResourceEphemeralStorage: resource.MustParse("500Gi"),
	}
}

func (a *agent) nodeStatus(now metav1.Time) corev1.NodeStatus {
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: s, Reason: reason, Message: msg, LastHeartbeatTime: now, LastTransitionTime: now}
	}
	return corev1.NodeStatus{
		Capacity:    nodeCapacity(),
		Allocatable: nodeCapacity(),
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{
			cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "localcluster node agent is posting ready status"),
			cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
			cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
			cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
		},
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: a.cfg.NodeIP},
			{Type: corev1.NodeHostName, Address: a.cfg.NodeName},
		},
		DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: int32(a.cfg.KubeletPort)}},
		NodeInfo: corev1.NodeSystemInfo{
			KubeletVersion:          KubeletVersion,
			OperatingSystem:         "linux",
			Architecture:            runtime.GOARCH,
			OSImage:                 "localcluster (pods as local processes)",
			ContainerRuntimeVersion: "localcluster://0.1",
		},
	}
}

// registerNode creates the Node or, when it exists from an earlier run, refreshes it.
func (a *agent) registerNode(ctx context.Context) error {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: a.cfg.NodeName,
			Labels: map[string]string{
				"kubernetes.io/hostname": a.cfg.NodeName,
				"kubernetes.io/os":       "linux",
				"kubernetes.io/arch":     runtime.GOARCH,
				"beta.kubernetes.io/os":  "linux",
			},
		},
		Spec: corev1.NodeSpec{PodCIDR: a.cfg.PodCIDR, PodCIDRs: []string{a.cfg.PodCIDR}},
	}
	var err error
	for attempt := 0; attempt < 30; attempt++ {
		_, err = a.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err == nil || apierrors.IsAlreadyExists(err) {
			err = nil
			break
		}
		klog.ErrorS(err, "registering node (retrying)")
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
	if err != nil {
		return fmt.Errorf("registering node %s: %w", a.cfg.NodeName, err)
	}
	return a.updateNodeStatus(ctx)
}

func (a *agent) updateNodeStatus(ctx context.Context) error {
	n, err := a.client.CoreV1().Nodes().Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("reading node: %w", err)
	}
	st := a.nodeStatus(metav1.Now())
	// Keep transition times of unchanged conditions.
	for i, c := range st.Conditions {
		for _, old := range n.Status.Conditions {
			if old.Type == c.Type && old.Status == c.Status {
				st.Conditions[i].LastTransitionTime = old.LastTransitionTime
			}
		}
	}
	n.Status = st
	_, err = a.client.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
	if err != nil {
		return fmt.Errorf("updating node status: %w", err)
	}
	return nil
}

// heartbeat renews the node Lease every 10 s and the node status every minute, as the kubelet
// does, so the node lifecycle controller never marks the node unreachable.
func (a *agent) heartbeat(ctx context.Context) error {
	leases := a.client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	lastStatus := time.Now()
	for {
		now := metav1.NewMicroTime(time.Now())
		l, err := leases.Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			n, nerr := a.client.CoreV1().Nodes().Get(ctx, a.cfg.NodeName, metav1.GetOptions{})
			lease := &coordinationv1.Lease{
				ObjectMeta: metav1.ObjectMeta{Name: a.cfg.NodeName, Namespace: corev1.NamespaceNodeLease},
				Spec: coordinationv1.LeaseSpec{
					HolderIdentity: ptr.To(a.cfg.NodeName), LeaseDurationSeconds: ptr.To(int32(leaseSeconds)), RenewTime: &now,
				},
			}
			if nerr == nil {
				lease.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: n.Name, UID: n.UID}}
			}
			if _, err := leases.Create(ctx, lease, metav1.CreateOptions{}); err != nil {
				klog.ErrorS(err, "creating node lease")
			}
		case err != nil:
			klog.ErrorS(err, "reading node lease")
		default:
			l.Spec.RenewTime = &now
			l.Spec.HolderIdentity = ptr.To(a.cfg.NodeName)
			l.Spec.LeaseDurationSeconds = ptr.To(int32(leaseSeconds))
			if _, err := leases.Update(ctx, l, metav1.UpdateOptions{}); err != nil {
				klog.ErrorS(err, "renewing node lease")
			}
		}
		if time.Since(lastStatus) > time.Minute {
			if err := a.updateNodeStatus(ctx); err != nil {
				klog.ErrorS(err, "node status")
			}
			lastStatus = time.Now()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}
