"""Reading finished runs: what their logs and configs say (`run_folders`; the files themselves are
`sparse_detr.run_folder`'s), and attention statistics of a
trained model over a data split (`attention_stats`). The figures live in `sparse_detr.viz`."""
