package nodeagent

import (
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func statusRuntime(pod *corev1.Pod) *podRuntime {
	a := &agent{cfg: Config{NodeIP: "10.244.0.1"}}
	r := &podRuntime{a: a, pod: pod, uid: pod.UID, startTime: metav1.Now(),
		transitions: map[corev1.PodConditionType]metav1.Time{}, lastCond: map[corev1.PodConditionType]corev1.ConditionStatus{}}
	for _, c := range pod.Spec.InitContainers {
		r.initC = append(r.initC, newContainerRuntime(c, true))
	}
	for _, c := range pod.Spec.Containers {
		r.appC = append(r.appC, newContainerRuntime(c, false))
	}
	return r
}

func condition(st corev1.PodStatus, t corev1.PodConditionType) corev1.ConditionStatus {
	for _, c := range st.Conditions {
		if c.Type == t {
			return c.Status
		}
	}
	return ""
}

func TestComputeStatusLifecycle(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "warren-rabbitmq-0", Namespace: "default", UID: "u1"},
		Spec: corev1.PodSpec{
			RestartPolicy:  corev1.RestartPolicyAlways,
			InitContainers: []corev1.Container{{Name: "erlang-cookie", Image: "rabbitmq:4.3"}},
			Containers:     []corev1.Container{{Name: "rabbitmq", Image: "rabbitmq:4.3"}},
		},
		Status: corev1.PodStatus{QOSClass: corev1.PodQOSBurstable, Conditions: []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionTrue}}},
	}
	r := statusRuntime(pod)
	now := time.Now()

	st := r.computeStatus(now)
	if st.Phase != corev1.PodPending || st.PodIP != "" || condition(st, corev1.PodReady) != corev1.ConditionFalse {
		t.Fatalf("before the sandbox: %+v", st)
	}
	if condition(st, corev1.PodScheduled) != corev1.ConditionTrue || st.QOSClass != corev1.PodQOSBurstable {
		t.Errorf("the scheduler's condition and the QoS class must be kept: %+v", st.Conditions)
	}
	if st.ContainerStatuses[0].State.Waiting == nil || st.ContainerStatuses[0].State.Waiting.Reason != "PodInitializing" {
		t.Errorf("app container while initializing: %+v", st.ContainerStatuses[0].State)
	}

	r.ip = netip.MustParseAddr("10.244.0.5")
	r.initC[0].status.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed"}}
	r.initC[0].ready = true
	r.initialized, r.started = true, true
	r.appC[0].status.State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.Now()}}
	r.appC[0].started = true
	st = r.computeStatus(now.Add(time.Second))
	if st.Phase != corev1.PodRunning || st.PodIP != "10.244.0.5" || st.HostIP != "10.244.0.1" {
		t.Fatalf("running: phase %s ip %s host %s", st.Phase, st.PodIP, st.HostIP)
	}
	if condition(st, corev1.PodInitialized) != corev1.ConditionTrue || condition(st, corev1.ContainersReady) != corev1.ConditionFalse {
		t.Errorf("running, not ready: %+v", st.Conditions)
	}
	if st.ContainerStatuses[0].Started == nil || !*st.ContainerStatuses[0].Started || st.ContainerStatuses[0].Ready {
		t.Errorf("container started but not ready: %+v", st.ContainerStatuses[0])
	}
	readyAt := now.Add(2 * time.Second)
	r.appC[0].ready = true
	st = r.computeStatus(readyAt)
	if condition(st, corev1.PodReady) != corev1.ConditionTrue || !st.ContainerStatuses[0].Ready {
		t.Fatalf("ready: %+v", st)
	}
	for _, c := range st.Conditions {
		if c.Type == corev1.PodReady && !c.LastTransitionTime.Time.Equal(metav1.NewTime(readyAt).Time) {
			t.Errorf("Ready transition time %v, want %v", c.LastTransitionTime, readyAt)
		}
		if c.Type == corev1.PodInitialized && !c.LastTransitionTime.Time.Equal(metav1.NewTime(now.Add(time.Second)).Time) {
			t.Errorf("Initialized transition time moved: %v", c.LastTransitionTime)
		}
	}

	// Crash: waiting in back-off with the last termination kept; restartPolicy Always stays Running.
	r.appC[0].ready = false
	r.appC[0].status.RestartCount = 1
	r.appC[0].status.LastTerminationState = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 1, Reason: "Error"}}
	r.appC[0].status.State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff"}}
	st = r.computeStatus(now.Add(3 * time.Second))
	cs := st.ContainerStatuses[0]
	if st.Phase != corev1.PodRunning || cs.RestartCount != 1 || cs.LastTerminationState.Terminated.ExitCode != 1 || cs.State.Waiting.Reason != "CrashLoopBackOff" {
		t.Errorf("crash loop: phase %s status %+v", st.Phase, cs)
	}
	if condition(st, corev1.PodReady) != corev1.ConditionFalse {
		t.Error("a crashed container is not ready")
	}
}

func TestComputeStatusCompletedTestPod(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "warren-test-send-job", Namespace: "default", UID: "u2"},
		Spec:       corev1.PodSpec{RestartPolicy: corev1.RestartPolicyNever, Containers: []corev1.Container{{Name: "send-job", Image: "curlimages/curl:8.13.0"}}},
	}
	r := statusRuntime(pod)
	r.ip = netip.MustParseAddr("10.244.0.9")
	r.initialized, r.started = true, true
	r.appC[0].status.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 0, Reason: "Completed"}}
	st := r.computeStatus(time.Now())
	if st.Phase != corev1.PodSucceeded {
		t.Errorf("phase %s, want Succeeded", st.Phase)
	}
	r.appC[0].status.State.Terminated.ExitCode = 1
	if st := r.computeStatus(time.Now()); st.Phase != corev1.PodFailed {
		t.Errorf("phase %s, want Failed", st.Phase)
	}
}
