// Command stepserve-generate generates images with previews and writes them to disk.
//
//	stepserve-generate [-target 127.0.0.1:50051] [-out out] [-token T] PROMPT
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"stepserve/client"
	pb "stepserve/gen/stepserve/v1"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051", "server host:port")
	out := flag.String("out", "out", "directory for the images and previews")
	token := flag.String("token", os.Getenv("STEPSERVE_TOKEN"), "bearer token")
	flag.Parse()
	prompt := "a red circle on the left"
	if flag.NArg() > 0 {
		prompt = flag.Arg(0)
	}
	if err := run(*target, *token, prompt, *out); err != nil {
		var e *client.Error
		if errors.As(err, &e) {
			fmt.Fprintln(os.Stderr, e)
			for _, v := range e.FieldViolations {
				fmt.Fprintf(os.Stderr, "  %s: %s\n", v.Field, v.Description)
			}
		} else {
			fmt.Fprintln(os.Stderr, err)
		}
		os.Exit(1)
	}
}

func run(target, token, prompt, out string) error {
	ctx := context.Background()
	c, err := client.Dial(ctx, client.Options{Target: target, Token: token})
	if err != nil {
		return err
	}
	defer c.Close()
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	seed := uint64(7)
	stream, err := c.Generate(ctx, &pb.GenerateRequest{Prompt: prompt, Seed: &seed, NumImages: 2, PreviewEveryNSteps: 5})
	if err != nil {
		return err
	}
	for {
		ev, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		switch e := ev.Event.(type) {
		case *pb.GenerateResponse_Queued:
			fmt.Printf("queued at %d\n", e.Queued.GetPosition())
		case *pb.GenerateResponse_Progress:
			p := e.Progress
			fmt.Printf("step %d/%d\n", p.GetStep(), p.GetTotalSteps())
			if p.GetPreview() != nil {
				name := filepath.Join(out, fmt.Sprintf("preview-%d.jpg", p.GetStep()))
				if err := os.WriteFile(name, p.GetPreview().GetData(), 0o644); err != nil {
					return err
				}
			}
		case *pb.GenerateResponse_Result:
			for i, img := range e.Result.GetImages() {
				if err := os.WriteFile(filepath.Join(out, fmt.Sprintf("image-%d.png", i)), img.GetData(), 0o644); err != nil {
					return err
				}
			}
			fmt.Printf("%d images, %.3f accelerator-seconds\n", len(e.Result.GetImages()), e.Result.GetUsage().GetAcceleratorSeconds())
		}
	}
}
