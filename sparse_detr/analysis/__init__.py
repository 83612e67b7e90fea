"""Reading finished runs: run folders and their logs (`run_folders`), and attention statistics of a
trained model over a data split (`attention_stats`). The figures live in `sparse_detr.viz`."""
