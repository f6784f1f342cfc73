// llama-logits: llama.cpp's last-token logits on given token ids (bench/peer/check.py compiles and runs it).
//
// usage: llama-logits MODEL THREADS PROMPT_LEN ID...
//
// The first PROMPT_LEN ids go through llama_decode as one batch (a prompt); every later id goes through
// alone, reading the KV cache the earlier calls filled (decode steps). After each call the logits of its
// last token are printed as one line of n_vocab floats, so the output has 1 + (number of ids - PROMPT_LEN)
// lines. Written against include/llama.h rather than through Python bindings of it: the compiler checks
// the calls against the installed header, so a changed struct layout cannot go unnoticed as it would
// through ctypes.
#include <stdio.h>
#include <stdlib.h>

#include "llama.h"

static void quiet(enum ggml_log_level level, const char * text, void * data) {
    (void) data;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static int decode_and_print(struct llama_context * ctx, llama_token * ids, int n, int n_vocab) {
    if (llama_decode(ctx, llama_batch_get_one(ids, n)) != 0) {
        fprintf(stderr, "llama_decode failed on %d tokens\n", n);
        return 1;
    }
    const float * logits = llama_get_logits_ith(ctx, -1);  // the batch's last token (the only output)
    if (logits == NULL) {
        fprintf(stderr, "no logits\n");
        return 1;
    }
    for (int i = 0; i < n_vocab; i++) {
        printf(i ? " %.9g" : "%.9g", logits[i]);
    }
    printf("\n");
    return 0;
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL THREADS PROMPT_LEN ID...\n", argv[0]);
        return 2;
    }
    const int threads  = atoi(argv[2]);
    const int n_prompt = atoi(argv[3]);
    const int n_ids    = argc - 4;
    if (threads < 1 || n_prompt < 1 || n_prompt > n_ids) {
        fprintf(stderr, "bad THREADS or PROMPT_LEN\n");
        return 2;
    }
    llama_token * ids = malloc(sizeof(llama_token) * n_ids);
    for (int i = 0; i < n_ids; i++) {
        ids[i] = atoi(argv[4 + i]);
    }

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;  // the CPU, as the benchmark
    struct llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (model == NULL) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx           = n_ids;
    cparams.n_batch         = n_ids;
    cparams.n_ubatch        = n_ids;
    cparams.n_threads       = threads;
    cparams.n_threads_batch = threads;
    struct llama_context * ctx = llama_init_from_model(model, cparams);
    if (ctx == NULL) {
        fprintf(stderr, "cannot make a context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    int status = decode_and_print(ctx, ids, n_prompt, n_vocab);
    for (int i = n_prompt; i < n_ids && status == 0; i++) {
        status = decode_and_print(ctx, ids + i, 1, n_vocab);
    }

    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(ids);
    return status;
}
