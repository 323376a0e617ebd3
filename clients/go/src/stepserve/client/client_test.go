package client

// The client against a live stepserve server on the embedded model (started by
// tests/test_clients.py, which sets STEPSERVE_TARGET and STEPSERVE_METRICS_URL).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	pb "stepserve/gen/stepserve/v1"
)

func dial(t *testing.T) *Client {
	t.Helper()
	target := os.Getenv("STEPSERVE_TARGET")
	if target == "" || os.Getenv("STEPSERVE_METRICS_URL") == "" {
		t.Fatal("set STEPSERVE_TARGET and STEPSERVE_METRICS_URL (tests/test_clients.py does)")
	}
	c, err := Dial(context.Background(), Options{Target: target})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func timeout(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func cancelledCount(t *testing.T) float64 {
	t.Helper()
	resp, err := http.Get(os.Getenv("STEPSERVE_METRICS_URL"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "stepserve_requests_total{") && strings.Contains(line, `code="cancelled"`) {
			v, err := strconv.ParseFloat(line[strings.LastIndex(line, " ")+1:], 64)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	return 0
}

func TestHealthCheck(t *testing.T) {
	c := dial(t)
	for _, service := range []string{"", "stepserve.v1.ImageGenerationService"} {
		ok, err := c.IsServing(timeout(t), service)
		if err != nil || !ok {
			t.Fatalf("IsServing(%q) = %v, %v", service, ok, err)
		}
	}
	models, err := c.ListModels(timeout(t))
	if err != nil || models[0].GetName() != "tiny-shapes" || !models[0].GetIsDefault() {
		t.Fatalf("ListModels: %v %v", models, err)
	}
}

func TestGenerateStreamsProgressWithPreviewsThenImages(t *testing.T) {
	c := dial(t)
	seed := uint64(3)
	stream, err := c.Generate(timeout(t), &pb.GenerateRequest{
		Prompt: "a red circle on the left", Seed: &seed, Steps: 6, NumImages: 2, PreviewEveryNSteps: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	var steps, previews []uint32
	var result *pb.Result
	for {
		ev, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if p := ev.GetProgress(); p != nil {
			steps = append(steps, p.GetStep())
			if p.GetPreview() != nil {
				previews = append(previews, p.GetStep())
			}
		}
		if r := ev.GetResult(); r != nil {
			result = r
		}
	}
	if !reflect.DeepEqual(steps, []uint32{1, 2, 3, 4, 5, 6}) || !reflect.DeepEqual(previews, []uint32{2, 4, 6}) {
		t.Fatalf("steps %v, previews at %v", steps, previews)
	}
	if result == nil || len(result.GetImages()) != 2 || result.GetImages()[1].GetSeed() != 4 {
		t.Fatalf("result %v", result)
	}
	if !bytes.HasPrefix(result.GetImages()[0].GetData(), []byte("\x89PNG")) || result.GetUsage().GetAcceleratorSeconds() <= 0 {
		t.Fatalf("not a PNG, or no usage: %v", result.GetUsage())
	}
}

func TestCancellingTheContextCancelsTheGeneration(t *testing.T) {
	c := dial(t)
	before := cancelledCount(t)
	ctx, cancel := context.WithCancel(timeout(t))
	defer cancel()
	stream, err := c.Generate(ctx, &pb.GenerateRequest{Prompt: "a blue square", Steps: 150})
	if err != nil {
		t.Fatal(err)
	}
	for {
		ev, err := stream.Recv()
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Code != codes.Canceled || CodeName(e.Code) != "CANCELLED" {
				t.Fatalf("got %v, want CANCELLED", err)
			}
			break
		}
		if ev.GetProgress() != nil {
			cancel()
		}
		if ev.GetResult() != nil {
			t.Fatal("the generation finished")
		}
	}
	// The server counts the call when it sees the caller leave.
	for i := 0; i < 100 && cancelledCount(t) <= before; i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if got := cancelledCount(t); got != before+1 {
		t.Fatalf("cancelled requests %v, want %v", got, before+1)
	}
}

func TestInvalidRequestNamesItsFields(t *testing.T) {
	c := dial(t)
	_, err := c.GenerateImages(timeout(t), &pb.GenerateRequest{Prompt: "", WidthPx: 33, Steps: 100000})
	var e *Error
	if !errors.As(err, &e) || e.Code != codes.InvalidArgument || CodeName(e.Code) != "INVALID_ARGUMENT" {
		t.Fatalf("got %v, want INVALID_ARGUMENT", err)
	}
	var fields []string
	for _, v := range e.FieldViolations {
		fields = append(fields, v.Field)
		if v.Field == "width_px" && !strings.Contains(v.Description, "multiple of 8") {
			t.Errorf("width_px: %q", v.Description)
		}
	}
	sort.Strings(fields)
	if !reflect.DeepEqual(fields, []string{"prompt", "steps", "width_px"}) {
		t.Fatalf("field violations %v", e.FieldViolations)
	}
}

func TestExampleProgramWritesImagesAndPreviews(t *testing.T) {
	out := t.TempDir()
	cmd := exec.Command("go", "run", "stepserve/cmd/stepserve-generate", "-target", os.Getenv("STEPSERVE_TARGET"), "-out", out, "a green triangle")
	stdout, err := cmd.Output()
	if err != nil {
		t.Fatalf("%v: %s", err, stdout)
	}
	if !strings.Contains(string(stdout), "2 images") {
		t.Fatalf("output: %s", stdout)
	}
	for _, name := range []string{"image-0.png", "image-1.png", "preview-5.jpg"} {
		if _, err := os.Stat(filepath.Join(out, name)); err != nil {
			t.Error(err)
		}
	}
}

func TestRoutingHintsAreThePythonClients(t *testing.T) {
	// tests/test_clients.py computes the same request's hints with the Python client.
	var want map[string]string
	if err := json.Unmarshal([]byte(os.Getenv("STEPSERVE_ROUTING_HINTS")), &want); err != nil {
		t.Fatalf("STEPSERVE_ROUTING_HINTS: %v", err)
	}
	seed, guidance := uint64(1), float32(7.5)
	req := &pb.GenerateRequest{
		Prompt: "a red circle", Seed: &seed, Steps: 4, GuidanceScale: &guidance, RequestId: "r1",
		PreviewEveryNSteps: 2, Loras: []*pb.LoraWeight{{Name: "b"}, {Name: "a", Scale: 0.5}},
	}
	if got := RoutingMetadata(req); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if got := RoutingMetadata(&pb.GenerateRequest{Prompt: "x"}); len(got) != 0 {
		t.Fatalf("unseeded, no adapters: %v", got)
	}
}
