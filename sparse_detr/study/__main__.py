from sparse_detr.study.command import main

main()
