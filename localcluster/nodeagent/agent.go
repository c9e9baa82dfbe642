// Package nodeagent is localcluster's kubelet stand-in: it registers a Node (with Lease
// heartbeats), runs the pods bound to it as local processes (each pod in its own network
// namespace with its own IP, each container in its own mount and UTS namespaces with the pod's
// volumes bind-mounted at their mountPaths), writes pod status as a kubelet does, serves the
// kubelet API the apiserver calls for logs, exec and port-forward, answers cluster DNS, proxies
// Service ClusterIPs to ready endpoints, and provisions PVCs of the default StorageClass into
// local directories. Container images are mapped to local programs (see images.yaml).
package nodeagent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
)

// Config is what `localcluster up` passes to Run.
type Config struct {
	Kubeconfig    string // the node's identity (system:node:<NodeName>)
	StateDir      string // pod directories, logs, provisioned volumes
	NodeName      string
	NodeIP        string // Node InternalIP and pod hostIP: the bridge address (first of PodCIDR)
	ImageMap      string // path of images.yaml
	KubeletCert   string // serving certificate of the kubelet API
	KubeletKey    string
	ClientCA      string // CA of the apiserver's kubelet client certificate
	KubeletPort   int
	PodCIDR       string // e.g. 10.244.0.0/24; the bridge takes its first address
	ClusterDNS    string // DNS server address (a /32 on the bridge), e.g. 10.96.0.10
	ServiceCIDR   string // ClusterIP range, routed to the services namespace (default 10.96.0.0/16)
	ClusterDomain string
	Bridge        string // host bridge name (default warren0)
	// WritableRoot ignores readOnlyRootFilesystem (debugging aid).
	WritableRoot bool
}

type agent struct {
	cfg     Config
	ctx     context.Context
	client  kubernetes.Interface
	images  *ImageMap
	net     *network
	podsDir string
	logsDir string // container logs (see podRuntime.logPath)
	// initProgram starts each container process (see containerInitProgram).
	initProgram string

	cmLister    corelisters.ConfigMapLister
	secLister   corelisters.SecretLister
	svcLister   corelisters.ServiceLister
	sliceLister discoverylisters.EndpointSliceLister
	pvcLister   corelisters.PersistentVolumeClaimLister
	pvLister    corelisters.PersistentVolumeLister

	recorder record.EventRecorder

	mu   sync.Mutex
	pods map[types.UID]*podRuntime
}

func (c *Config) defaults() error {
	if c.Bridge == "" {
		c.Bridge = "warren0"
	}
	if c.ClusterDomain == "" {
		c.ClusterDomain = "cluster.local"
	}
	if c.KubeletPort == 0 {
		c.KubeletPort = 10250
	}
	if c.NodeIP == "" {
		p, err := netip.ParsePrefix(c.PodCIDR)
		if err != nil {
			return fmt.Errorf("pod CIDR %q: %w", c.PodCIDR, err)
		}
		c.NodeIP = p.Masked().Addr().Next().String()
	}
	if c.NodeName == "" || c.StateDir == "" || c.Kubeconfig == "" || c.ImageMap == "" || c.ClusterDNS == "" {
		return errors.New("node agent config: NodeName, StateDir, Kubeconfig, ImageMap and ClusterDNS are required")
	}
	return nil
}

// Run runs the node agent until ctx ends; it stops every pod process before returning.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.defaults(); err != nil {
		return err
	}
	rc, err := clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig)
	if err != nil {
		return fmt.Errorf("node kubeconfig: %w", err)
	}
	rc.QPS, rc.Burst = 50, 100
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	imageDir, _ := filepath.Abs(filepath.Dir(cfg.ImageMap))
	images, err := LoadImageMap(cfg.ImageMap, func(k string) string {
		if k == "LOCALCLUSTER_DIR" && os.Getenv(k) == "" {
			return imageDir
		}
		return os.Getenv(k)
	})
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("locating this binary: %w", err)
	}
	nw, err := newNetwork(cfg.Bridge, cfg.PodCIDR)
	if err != nil {
		return err
	}
	a := &agent{
		cfg: cfg, ctx: ctx, client: client, images: images, net: nw, initProgram: containerInitProgram(self),
		podsDir: filepath.Join(cfg.StateDir, "pods"), logsDir: filepath.Join(cfg.StateDir, "logs", "pods"),
		pods: map[types.UID]*podRuntime{},
	}
	if err := os.MkdirAll(a.podsDir, 0o755); err != nil {
		return err
	}
	events := record.NewBroadcaster(record.WithContext(ctx))
	events.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	defer events.Shutdown()
	a.recorder = events.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "kubelet", Host: cfg.NodeName})
	// Pod directories of a previous run hold nothing alive (processes die with the agent).
	if entries, err := os.ReadDir(a.podsDir); err == nil {
		for _, e := range entries {
			_ = os.RemoveAll(filepath.Join(a.podsDir, e.Name()))
		}
	}
	if err := nw.setup(ctx); err != nil {
		return fmt.Errorf("pod network: %w", err)
	}
	defer nw.teardown()
	if err := nw.addHostAddr(ctx, netip.MustParseAddr(cfg.ClusterDNS)); err != nil {
		return fmt.Errorf("cluster DNS address: %w", err)
	}
	serviceCIDR := cfg.ServiceCIDR
	if serviceCIDR == "" {
		serviceCIDR = "10.96.0.0/16"
	}
	if err := nw.setupServices(ctx, serviceCIDR, cfg.ClusterDNS); err != nil {
		return fmt.Errorf("services namespace: %w", err)
	}

	shared := informers.NewSharedInformerFactory(client, 10*time.Minute)
	a.cmLister = shared.Core().V1().ConfigMaps().Lister()
	a.secLister = shared.Core().V1().Secrets().Lister()
	a.svcLister = shared.Core().V1().Services().Lister()
	a.sliceLister = shared.Discovery().V1().EndpointSlices().Lister()
	a.pvcLister = shared.Core().V1().PersistentVolumeClaims().Lister()
	a.pvLister = shared.Core().V1().PersistentVolumes().Lister()
	svcInf := shared.Core().V1().Services().Informer()
	sliceInf := shared.Discovery().V1().EndpointSlices().Informer()
	pvcInf := shared.Core().V1().PersistentVolumeClaims().Informer()
	pvInf := shared.Core().V1().PersistentVolumes().Informer()

	podFactory := informers.NewSharedInformerFactoryWithOptions(client, 10*time.Minute,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", cfg.NodeName).String()
		}))
	podInf := podFactory.Core().V1().Pods().Informer()

	if err := a.registerNode(ctx); err != nil {
		return err
	}
	errc := make(chan error, 4)
	go func() { errc <- a.heartbeat(ctx) }()

	proxy := newServiceProxy(a)
	dns := newDNSServer(a)
	prov := newProvisioner(a)
	for _, h := range []cache.ResourceEventHandler{proxy.handler(), dns.handler()} {
		if _, err := svcInf.AddEventHandler(h); err != nil {
			return err
		}
		if _, err := sliceInf.AddEventHandler(h); err != nil {
			return err
		}
	}
	if _, err := pvcInf.AddEventHandler(prov.handler()); err != nil {
		return err
	}
	if _, err := pvInf.AddEventHandler(prov.handler()); err != nil {
		return err
	}
	shared.Start(ctx.Done())
	for typ, ok := range shared.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("informer cache for %v did not sync", typ)
		}
	}
	if err := prov.ensureStorageClass(ctx); err != nil {
		return err
	}
	go func() { errc <- dns.run(ctx) }()
	go proxy.run(ctx)
	go prov.run(ctx)
	go func() { errc <- a.serveKubeletAPI(ctx) }()

	if _, err := podInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { a.syncPod(obj) },
		UpdateFunc: func(_, obj any) { a.syncPod(obj) },
		DeleteFunc: func(obj any) { a.podGone(obj) },
	}); err != nil {
		return err
	}
	podFactory.Start(ctx.Done())
	klog.InfoS("node agent running", "node", cfg.NodeName, "nodeIP", cfg.NodeIP, "podCIDR", cfg.PodCIDR)

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	a.stopAll()
	return runErr
}

// stopAll waits for every pod runtime to finish (their contexts derive from the agent's).
func (a *agent) stopAll() {
	a.mu.Lock()
	rts := make([]*podRuntime, 0, len(a.pods))
	for _, r := range a.pods {
		rts = append(rts, r)
	}
	a.mu.Unlock()
	for _, r := range rts {
		r.cancel()
	}
	for _, r := range rts {
		select {
		case <-r.done:
		case <-time.After(70 * time.Second):
		}
	}
}

func (a *agent) syncPod(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	a.mu.Lock()
	r, known := a.pods[pod.UID]
	a.mu.Unlock()
	if known {
		if pod.DeletionTimestamp != nil {
			r.terminate(pod)
		} else {
			r.update(pod)
		}
		return
	}
	if pod.DeletionTimestamp != nil {
		// Nothing of it runs here (e.g. it finished before this agent started): let it go.
		a.deletePodObject(a.ctx, pod)
		return
	}
	if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return
	}
	r = newPodRuntime(a, pod)
	a.mu.Lock()
	a.pods[pod.UID] = r
	a.mu.Unlock()
	klog.InfoS("starting pod", "pod", klog.KObj(pod), "uid", pod.UID)
	go r.run()
}

// deletePodObject removes a pod whose processes are gone (grace 0, only this very pod: UID
// precondition), as the kubelet's status manager does.
func (a *agent) deletePodObject(ctx context.Context, pod *corev1.Pod) {
	zero := int64(0)
	uid := pod.UID
	err := a.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name,
		metav1.DeleteOptions{GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &uid}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		klog.ErrorS(err, "deleting pod object", "pod", klog.KObj(pod))
	}
}

func (a *agent) podGone(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		if d, isTomb := obj.(cache.DeletedFinalStateUnknown); isTomb {
			pod, ok = d.Obj.(*corev1.Pod)
		}
		if !ok {
			return
		}
	}
	a.mu.Lock()
	r, known := a.pods[pod.UID]
	a.mu.Unlock()
	if known {
		r.terminate(pod)
	}
}

func (a *agent) forget(uid types.UID) {
	a.mu.Lock()
	delete(a.pods, uid)
	a.mu.Unlock()
}

func (a *agent) podByName(namespace, name string) (*podRuntime, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range a.pods {
		if r.pod.Namespace == namespace && r.pod.Name == name {
			return r, nil
		}
	}
	return nil, fmt.Errorf("pod %s/%s is not running on this node", namespace, name)
}

// ConfigMap implements objectSource (GET through the informer cache, then the API).
func (a *agent) ConfigMap(namespace, name string) (*corev1.ConfigMap, error) {
	if cm, err := a.cmLister.ConfigMaps(namespace).Get(name); err == nil {
		return cm, nil
	}
	return a.client.CoreV1().ConfigMaps(namespace).Get(a.ctx, name, metav1.GetOptions{})
}

// Secret implements objectSource.
func (a *agent) Secret(namespace, name string) (*corev1.Secret, error) {
	if s, err := a.secLister.Secrets(namespace).Get(name); err == nil {
		return s, nil
	}
	return a.client.CoreV1().Secrets(namespace).Get(a.ctx, name, metav1.GetOptions{})
}

// ServiceAccountToken implements volumeSource with a TokenRequest bound to the pod.
func (a *agent) ServiceAccountToken(ctx context.Context, pod *corev1.Pod, audience string, exp int64) (string, error) {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: &exp,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}
	if audience != "" {
		req.Spec.Audiences = []string{audience}
	}
	tr, err := a.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	return tr.Status.Token, nil
}

// services lists every Service (for the pod environment).
func (a *agent) services() []*corev1.Service {
	svcs, err := a.svcLister.List(labels.Everything())
	if err != nil {
		return nil
	}
	return svcs
}
